"""The llama-cli command, in-process and as a subprocess."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, make_model_folder, subprocess_env
from llama_cli.cli import cli

BASE = ["--max_seq_len", "64", "--max_gen_len", "8", "--temperature", "0"]


def run_cli(capsys, *args):
    code = cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_proc(*args, stdin=None, env=None, timeout=120):
    cmd = [sys.executable, "-m", "llama_cli", *[str(a) for a in args]]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**subprocess_env(), **(env or {})}, cwd=REPO)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_path):
    return make_model_folder(tmp_path_factory.mktemp("cli"), spm_path, TINY)[0]


def test_text_output_keeps_prompts_as_text(capsys, ckpt):
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "42", "--prompt", "True", "--prompt",
                             "hello, world", *BASE)
    assert code == 0
    blocks = out.split("\n\n")
    assert blocks[0].startswith("42") and blocks[1].startswith("True") and blocks[2].startswith("hello, world")
    assert "tokens/s" in err  # timing goes to stderr, not stdout
    assert "tokens/s" not in out


def test_jsonl_output_line_by_line(capsys, ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "Hello world", "id": "a"}, {"prompt": "The dog", "id": 7, "max_gen_len": 3},
            {"prompt": "42"}, {"prompt": "Why", "temperature": 0.9, "top_p": 0.5}, {"prompt": "Ok then"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--logprobs",
                             "--max_batch_size", "2", *BASE)
    assert code == 0
    recs = jsonl(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r.get("id") for r in recs] == ["a", 7, None, None, None]
    for rec, row in zip(recs, rows):
        assert set(rec) >= {"prompt", "generation", "tokens", "logprobs"}
        assert rec["prompt"] == row["prompt"]
        assert all(isinstance(t, int) for t in rec["tokens"]) and len(rec["logprobs"]) == len(rec["tokens"])
        assert all(lp <= 0 for lp in rec["logprobs"])
        assert len(rec["tokens"]) <= row.get("max_gen_len", 8)
    assert len(recs[1]["tokens"]) <= 3


def test_batches_equal_one_at_a_time(capsys, ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Hello world\nThe cat sleeps under the tree\n\n42\nA\nRed green blue\n")
    _, batched, _ = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl",
                            "--max_batch_size", "4", *BASE)
    _, single, _ = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl",
                           "--max_batch_size", "1", *BASE)
    assert [r["prompt"] for r in jsonl(batched)] == ["Hello world", "The cat sleeps under the tree", "42", "A",
                                                     "Red green blue"]
    assert [r["tokens"] for r in jsonl(batched)] == [r["tokens"] for r in jsonl(single)]


def test_stream_prints_the_same_text(capsys, ckpt, tmp_path):
    _, plain, _ = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hello world", *BASE)
    _, streamed, _ = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hello world", "--stream", "--output_file",
                             tmp_path / "o.txt", *BASE)
    assert streamed.strip("\n") == plain.strip("\n")
    assert (tmp_path / "o.txt").read_text().strip("\n") == plain.strip("\n")  # the file still gets it


def test_quiet_and_progress(capsys, ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\n")
    _, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--max_batch_size", "1", *BASE)
    assert "3/3 prompts" in err and "ETA" in err
    _, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--quiet", *BASE)
    assert err == ""


def test_stdin_prompts_and_python_m(ckpt):
    proc = run_proc("--ckpt_dir", ckpt, "--output", "jsonl", *BASE, stdin="Hello world\nThe cat\n")
    assert proc.returncode == 0, proc.stderr
    assert [r["prompt"] for r in jsonl(proc.stdout)] == ["Hello world", "The cat"]


def test_console_script_help_is_fast():
    exe = os.path.join(os.path.dirname(sys.executable), "llama-cli")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "llama_cli"]
    start = time.perf_counter()
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 0
    assert "--prompts_file" in proc.stdout and "--max_batch_size" in proc.stdout
    assert time.perf_counter() - start < 5  # generous for CI; scripts/bench.py measures the real figure
    probe = subprocess.run([sys.executable, "-c", "import sys, llama_cli.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=subprocess_env())
    assert probe.stdout.strip() == "False"  # --help never imports torch


def test_cache_rows_follow_the_prompts(capsys, ckpt, tmp_path, monkeypatch):
    """One process builds a KV cache of as many rows as the prompts can use: one prompt, one row, whatever
    --max_batch_size says (a 7B model's cache at --max_seq_len 4096 is 2 GB a row; and `llama-cli compile`
    keeps its step for batch 1); more prompts, up to --max_batch_size; a resumed file with nothing left
    loads no model."""
    from helpers import spy_cache_rows

    rows = spy_cache_rows(monkeypatch)
    for prompts, batch in ((["Hi"], "8"), (["a", "b", "c"], "2"), (["a", "b", "c"], "8")):
        args = [a for p in prompts for a in ("--prompt", p)]
        out_file = tmp_path / f"{len(prompts)}-{batch}.jsonl"
        code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, *args, "--max_batch_size", batch, "--output", "jsonl",
                                 "--output_file", out_file, *BASE)
        assert code == 0 and len(jsonl(out)) == len(prompts) and "loaded" in err, err
    assert rows == [1, 2, 3]
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "a", "--prompt", "b", "--prompt", "c",
                             "--output", "jsonl", "--output_file", out_file, "--resume", *BASE)
    assert code == 0 and out == "" and "nothing to do" in err and "loaded" not in err
    assert rows == [1, 2, 3]


def run_until_results(args, out, n):
    """llama-cli started with `args` (stderr piped, as text), returned once `out` holds n result lines."""
    proc = subprocess.Popen([sys.executable, "-m", "llama_cli", *map(str, args)], env=subprocess_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < n):
        time.sleep(0.05)
    return proc


def test_output_file_and_resume_after_kill(ckpt, tmp_path):
    n = 40
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Prompt number {i} says hello", "id": f"p{i}"}) + "\n"
                         for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = ["--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--output_file", out,
            "--max_batch_size", "1", "--max_seq_len", "128", "--max_gen_len", "48", "--temperature", "0", "--quiet"]
    proc = run_until_results(args, out, 5)
    proc.kill()
    proc.wait()
    partial = out.read_text().count("\n")
    assert 5 <= partial < n, "the run should have been killed midway"
    with open(out, "a") as fh:
        fh.write('{"index": 99, "prompt": "cut sh')  # a line cut short by the kill
    resumed = run_proc(*args[:-1], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(jsonl(resumed.stdout)) == n - partial  # stdout shows only the new results
    recs = jsonl(out.read_text())
    assert [r["index"] for r in recs] == list(range(n))  # each prompt exactly once, in order
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(n)]
    fresh = run_proc(*[a if a != out else tmp_path / "fresh.jsonl" for a in args])
    assert [r["tokens"] for r in jsonl(fresh.stdout)] == [r["tokens"] for r in recs]
    again = run_proc(*args[:-1], "--resume")  # nothing left to do
    assert again.returncode == 0 and again.stdout == ""


def test_sampled_outputs_follow_the_prompt_not_its_batch(capsys, ckpt, tmp_path):
    """Sampling drew from one generator across the batch, so a prompt's sample hung on its batch-mates: another
    --max_batch_size or --schedule, or a --resume, gave other samples for the same --seed. Each prompt now draws
    from its own stream (the run's seed and its index in the input, or its own JSONL "seed"), the n-th token
    from the stream's n-th number: the same command samples the same tokens in any batch, and a resumed run
    finishes as the whole run would have."""
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Prompt {i} says", "max_gen_len": 4 + 3 * (i % 5)} for i in range(14)]
    rows[2].update(top_k=5, min_p=0.05, frequency_penalty=0.5)
    rows[3].update(prompt="Same text", seed=77, max_gen_len=12)
    rows[11].update(prompt="Same text", seed=77, max_gen_len=12)  # its own seed: the same draws anywhere
    rows[7].update(prompt="Same text", max_gen_len=12)  # no seed of its own: its index's
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--max_seq_len", "64", "--temperature",
            "1.0", "--top_p", "0.95", "--quiet"]

    def tokens(*more):
        code, out, err = run_cli(capsys, *args, *more)
        assert code == 0, err
        return {r["index"]: r["tokens"] for r in jsonl(out)}

    whole = tokens("--max_batch_size", "4", "--output_file", tmp_path / "whole.jsonl")
    assert tokens("--max_batch_size", "3", "--schedule", "static") == whole
    assert tokens("--max_batch_size", "1") == whole
    assert tokens("--max_batch_size", "16", "--noshare_prefixes") == whole
    assert whole[3] == whole[11] != whole[7]
    assert tokens("--max_batch_size", "4", "--seed", "2") != whole
    assert tokens("--max_batch_size", "4", "--seed", "2")[3] == whole[3]  # a prompt's own seed wins

    done = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)[:6]  # as a killed run left it
    (tmp_path / "part.jsonl").write_text("".join(done))
    resumed = tokens("--max_batch_size", "2", "--output_file", tmp_path / "part.jsonl", "--resume")
    assert len(resumed) == 8 and all(whole[i] == t for i, t in resumed.items())
    assert {r["index"]: r["tokens"] for r in jsonl((tmp_path / "part.jsonl").read_text())} == whole

    f.write_text(json.dumps({"prompt": "x", "seed": -1}) + "\n")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, 2, f'{f} line 1: "seed" must be an integer from 0 to 2**64 - 1, got -1')


def test_a_closed_standard_output_leaves_the_output_file_whole(ckpt, tmp_path):
    """Found by hand: `llama-cli ... --output_file out.jsonl | head -1` stopped the run when head ended, exit code 0,
    with out.jsonl holding a few of the results: a script took the job as done. With --output_file the run now goes
    on into the file alone (a warning says so); without one it still stops there, as `| head` expects."""
    n = 30
    f = tmp_path / "p.txt"
    f.write_text("".join(f"Prompt number {i} says hello\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = ["--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--max_batch_size", "1",
            "--max_seq_len", "128", "--max_gen_len", "40", "--temperature", "0"]
    for more in (["--output_file", out], []):
        proc = subprocess.Popen([sys.executable, "-m", "llama_cli", *map(str, args + more)], env=subprocess_env(),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert json.loads(proc.stdout.readline())["index"] == 0
        proc.stdout.close()  # as `head -1` does once it has its line
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, err
        if more:
            assert [r["index"] for r in jsonl(out.read_text())] == list(range(n))
            assert "standard output was closed after" in err and f"go to --output_file {out} only" in err
        else:
            assert f"{n} prompt(s)" not in err  # it stopped there
    assert "Traceback" not in err


def test_output_file_can_be_a_pipe(capsys, ckpt, tmp_path):
    """--output_file >(gzip > out.gz) in a shell is a pipe: results go through it (they used to, then the run
    failed on the flush to disk, which a pipe does not take)."""
    import os
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()), daemon=True)
    reader.start()
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--prompt", "there", "--output", "jsonl",
                             "--output_file", pipe, *BASE)
    reader.join(timeout=30)
    assert code == 0, err
    assert sorted(r["index"] for r in jsonl(got[0])) == [0, 1] and jsonl(got[0]) == jsonl(out)
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file", pipe,
                           "--resume", *BASE)  # nothing to read back from a pipe
    assert code == 2 and "--resume reads back --output_file, and" in err and "is not a file (a pipe?)" in err


def test_sigterm_ends_a_run_like_ctrl_c(ckpt, tmp_path):
    """kill / a job scheduler's time limit: the interrupt's one-line message, no traceback, exit 143, and the
    results written so far kept for --resume."""
    f = tmp_path / "p.txt"
    f.write_text("".join(f"Prompt number {i} says hello\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    args = ["--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--output_file", out,
            "--max_batch_size", "1", "--max_seq_len", "128", "--max_gen_len", "48", "--temperature", "0", "--quiet"]
    proc = run_until_results(args, out, 2)
    proc.terminate()
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert err.strip() == ("llama-cli: terminated; results already written to --output_file are kept "
                           "(rerun with --resume)"), err
    kept = jsonl(out.read_text())
    assert 2 <= len(kept) < 40 and all("tokens" in r for r in kept)


def test_sigterm_keeps_its_default_under_torchrun(monkeypatch):
    """One process: SIGTERM raises Terminated while a run lasts, and the old handler is back after it. Under
    torchrun (WORLD_SIZE > 1) it keeps its default: a rank blocked in a collective must still die at once."""
    import signal

    import llama_cli.cli as cli_mod

    seen = []
    monkeypatch.setattr(cli_mod, "_cli", lambda argv, debug: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli_mod.cli(["--version"]) == 0 and seen[-1] is cli_mod._terminate
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_mod.cli(["--version"]) == 0 and seen[-1] == before


def test_long_prompt_in_file_gets_an_error_entry_and_the_rest_continue(capsys, ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("short one\n" + "word " * 200 + "\nanother short\n")
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", *BASE)
    recs = jsonl(out)
    assert code == 1
    assert [("error" in r) for r in recs] == [False, True, False]
    assert "max_seq_len" in recs[1]["error"]
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--strict", *BASE)
    assert code == 2 and "prompt 2" in err and out == ""


def test_resume_retries_error_entries(capsys, ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("short one\n" + "word " * 30 + "\nanother short\n")
    out = tmp_path / "o.jsonl"
    args = ["--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", "--output_file", out,
            "--max_gen_len", "4", "--temperature", "0", "-q"]
    code, _, _ = run_cli(capsys, *args, "--max_seq_len", "64")
    first = sorted(jsonl(out.read_text()), key=lambda r: r["index"])  # the file is in finish order
    assert code == 1 and ["error" in r for r in first] == [False, True, False]
    code, stdout, _ = run_cli(capsys, *args, "--max_seq_len", "512", "--resume")  # room for it now
    assert code == 0
    assert [r["index"] for r in jsonl(stdout)] == [1]  # only the prompt that had failed ran again
    recs = jsonl(out.read_text())
    assert sorted(r["index"] for r in recs) == [0, 1, 2] and not any("error" in r for r in recs)


def test_existing_output_file_is_not_overwritten(capsys, ckpt, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"index": 0, "prompt": "x", "generation": "y", "tokens": []}\n')
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file", out,
                           *BASE)
    assert code == 2 and "--resume" in err
    assert out.read_text().count("\n") == 1


def test_resume_refuses_a_file_for_other_prompts(capsys, ckpt, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"index": 0, "prompt": "something else", "generation": "y", "tokens": []}\n')
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file", out,
                           "--resume", *BASE)
    assert code == 2 and "not prompt 1 of this input" in err


# --- bad input: one line on stderr, the right exit code, no traceback --------------------------------

def bad_folder(tmp_path, spm_path, kind):
    folder, _ = make_model_folder(tmp_path / kind, spm_path, TINY)
    if kind == "no_pth":
        (folder / "consolidated.00.pth").unlink()
    elif kind == "no_params":
        (folder / "params.json").unlink()
    elif kind == "params_not_json":
        (folder / "params.json").write_text("{oops")
    elif kind == "params_wrong_types":
        (folder / "params.json").write_text(json.dumps({**TINY, "n_heads": "four"}))
    elif kind == "weights_mismatch":
        (folder / "params.json").write_text(json.dumps({**TINY, "dim": 96, "n_heads": 4}))
    elif kind == "no_tokenizer":
        (folder / "tokenizer.model").unlink()
    elif kind == "not_a_tokenizer":
        (folder / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    elif kind == "vocab_mismatch":
        (folder / "params.json").write_text(json.dumps({**TINY, "vocab_size": 1000}))
    elif kind == "integer_weights":  # right names and shapes, but no weights
        import torch

        sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
        sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"].to(torch.int32)
        torch.save(sd, folder / "consolidated.00.pth")
    return folder


def assert_one_line_error(code, err, want_code, *needles):
    assert code == want_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("llama-cli: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # log lines may come before it, nothing after
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize("kind,needle", [
    ("no_pth", "no *.pth"), ("no_params", "params.json"), ("params_not_json", "not valid JSON"),
    ("params_wrong_types", "'n_heads' must be int"), ("weights_mismatch", "do not match"),
    ("no_tokenizer", "does not exist"), ("not_a_tokenizer", "not a readable tokenizer"),
    ("vocab_mismatch", "vocab_size=1000"),
    ("integer_weights", "'layers.0.attention.wq.weight' in consolidated.00.pth holds int32 values"),
])
def test_bad_checkpoint_folders(capsys, tmp_path, spm_path, kind, needle):
    folder = bad_folder(tmp_path, spm_path, kind)
    code, out, err = run_cli(capsys, "--ckpt_dir", folder, "--prompt", "Hi", *BASE)
    assert_one_line_error(code, err, 2, needle)
    assert out == ""


def test_missing_and_empty_ckpt_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--prompt", "Hi")
    assert_one_line_error(code, err, 2, "--ckpt_dir")
    code, _, err = run_cli(capsys, "--ckpt_dir", tmp_path / "none", "--prompt", "Hi")
    assert_one_line_error(code, err, 2, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "--ckpt_dir", tmp_path / "empty", "--prompt", "Hi", "--tokenizer_path",
                           tmp_path / "t")
    assert_one_line_error(code, err, 2, "is empty")


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-0.5"], "--temperature"), (["--top_p", "0"], "--top_p"), (["--top_p", "1.5"], "--top_p"),
    (["--max_gen_len", "0"], "--max_gen_len"), (["--max_gen_len", "ten"], "--max_gen_len"),
    (["--max_batch_size", "0"], "--max_batch_size"), (["--output", "xml"], "--output"),
    (["--seed", "-1"], "--seed must be an integer >= 0"), (["--seed", str(2**64)], "--seed must be an integer <= "),
    (["--prompt", "   "], "empty"), (["--bogus", "1"], "unknown flag --bogus; see llama-cli --help"),
    (["--tempreature", "0"], "unknown flag --tempreature; did you mean --temperature? see llama-cli --help"),
    (["--max_new_tokens", "9"], "did you mean --max_gen_len?"),
    (["--ctx", "64"], "did you mean --max_seq_len?"), (["-p", "Hi"], "did you mean --prompt?"),
    # llama.cpp's one-letter flags are hinted at; none is taken for another of ours (-f was --frequency_penalty)
    (["-f", "prompts.txt"], "unknown flag -f; did you mean --prompts_file?"),
    (["-n", "5"], "did you mean --max_gen_len?"),
    (["-t", "1"], "did you mean --threads?"), (["-e"], "unknown flag -e; did you mean --echo?"),
    (["-ngl", "99"], "unknown flag -ngl; did you mean --device?"),
    (["-i"], "unknown flag -i; that is a command here: llama-cli chat --ckpt_dir DIR (see llama-cli chat --help)"),
    (["--perplexity"], "that is a command here: llama-cli perplexity --ckpt_dir DIR --text_file FILE"),
    (["--resume"], "--output_file"),
    (["--kv_cache_dtype", "fp8"], "--kv_cache_dtype must be auto, fp32, bf16 or fp16, got 'fp8'"),
    (["--threads", "0"], "--threads must be an integer from 1 to "), (["--threads", "two"], "got 'two'"),
    (["--threads", "100000"], "(the CPUs this process may use), got 100000"),
    (["--stream", "--prompt", "two"], "--stream"),
    (["--prompt", "word " * 100], "max_seq_len"),
    (["--max_seq_len", "100000000", "--max_batch_size", "100000"], "KV cache needs"),
    (["--max_gen_len", "--temperature", "0"], "--max_gen_len needs a value, not the flag --temperature"),
    (["--max_gen_len", "--", "0"], "--max_gen_len needs a value"), (["--", "Hi"], "unexpected argument '--'"),
])
def test_bad_flags(capsys, ckpt, args, needle):
    base = ["--max_seq_len", "64", "--max_gen_len", "8"]
    argv = ["--ckpt_dir", ckpt, "--prompt", "Hi", *base, *args]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, 2, needle)
    assert out == ""


def test_a_value_without_its_flag_is_pointed_to_the_flag(capsys, ckpt, tmp_path):
    """A value given without a flag (`llama-cli convert model.gguf out`): each command says which flag it likely
    belongs to, or that it takes flags only; never the completion command's "--prompt" for a subcommand."""
    text = tmp_path / "t.txt"
    text.write_text("Some text.\n")
    cases = [(["Hello"], "text to complete goes after --prompt (see llama-cli --help)"),
             ([ckpt], "a checkpoint folder goes after --ckpt_dir (see llama-cli --help)"),
             (["chat", ckpt], "a checkpoint folder goes after --ckpt_dir (see llama-cli chat --help)"),
             (["convert", text, tmp_path / "out"], "the file or folder to convert goes after --src"),
             (["convert", "--src", text, tmp_path / "out"],
              "llama-cli convert takes flags only, each value after its flag (see llama-cli convert --help)"),
             (["perplexity", "--ckpt_dir", ckpt, text], "the text to score goes after --text_file"),
             (["quantize", ckpt, tmp_path / "q"], "a checkpoint folder goes after --ckpt_dir"),
             (["reshard", "--ckpt_dir", ckpt, "2"], "llama-cli reshard takes flags only")]
    for args, needle in cases:
        code, out, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, 2, needle)
        assert "--prompt" not in err or args == ["Hello"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()


def test_bad_prompt_files(capsys, ckpt, tmp_path):
    cases = {
        "latin1.txt": (b"hello\ncaf\xe9\n", "line 2 is not UTF-8"),
        "bad.jsonl": (b'{"prompt": "ok"}\n{"prompt": "x",}\n', "line 2 is not valid JSON"),
        "noprompt.jsonl": (b'{"prompt": "ok"}\n\n{"text": "x"}\n', 'line 3 has no "prompt"'),
        "badtype.jsonl": (b'{"prompt": "ok", "max_gen_len": "many"}\n', '"max_gen_len" must be an integer >= 1'),
        "empty.txt": (b"\n\n", "holds no prompts"),
        "model.gguf": (b"GGUF\x03\x00\x00\x00abc\n", "line 1 holds NUL bytes: it is a binary file"),
        "utf16.txt": ("hello\n".encode("utf-16"), "utf16.txt is UTF-16 text; save the file as UTF-8"),
        "utf16le.txt": ("hello\n".encode("utf-16-le"), "line 1 holds NUL bytes"),
        # lone halves of surrogate pairs, which JSON's \u escapes can write and no text holds (found by fuzz_cli)
        "lone.jsonl": (b'{"prompt": "ok"}\n{"prompt": "a\\ud800"}\n',
                       'line 2: "prompt" is not valid text: character 2 is \\ud800'),
        "lonestop.jsonl": (b'{"prompt": "ok", "stop": ["\\udc80"]}\n', 'line 1: "stop" is not valid text'),
        "loneid.jsonl": (b'{"prompt": "ok", "id": {"a": ["\\udfff"]}}\n', 'line 1: "id" is not valid text'),
        "lonemsg.jsonl": (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}\n',
                          'line 1: "messages" is not valid text'),
        "lone.json": (b'["ok", "\\ud800"]', "lone.json item 2 is not valid text"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", tmp_path / name, *BASE)
        assert_one_line_error(code, err, 2, needle)
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", tmp_path / "missing.txt", *BASE)
    assert_one_line_error(code, err, 2, "does not exist")


def test_command_line_text_that_is_not_utf8(capsys, ckpt):
    """Found by scripts/fuzz_cli.py: a --prompt with a byte that is not UTF-8 (Python holds it as a lone
    surrogate, \\udcff for 0xff) failed in the tokenizer with the catch-all's RuntimeError; a --stop so was taken
    and could never match. Through a real command line (the bytes as the shell passes them), then in process."""
    proc = run_proc("--ckpt_dir", ckpt, "--prompt", "ab\udcffc", *BASE)
    assert_one_line_error(proc.returncode, proc.stderr, 2, "--prompt 1 is not valid text: character 3 is \\udcff",
                          "give UTF-8 text")
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--stop", "x\udcff", *BASE)
    assert_one_line_error(code, err, 2, "--stop is not valid text: character 2")
    code, _, err = run_cli(capsys, "chat", "--ckpt_dir", ckpt, "--system", "\udcff", *BASE)
    assert_one_line_error(code, err, 2, "--system is not valid text")
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "caf\u00e9 \U0001f600", *BASE)
    assert code == 0 and out.startswith("caf\u00e9 \U0001f600"), err  # real characters outside ASCII are fine


def test_file_names_that_are_not_utf8(capsys, ckpt, tmp_path):
    """Found by scripts/fuzz_cli.py: a folder or file whose name has bytes that are not UTF-8 (valid on Linux;
    Python holds them as lone surrogates) failed inside PyTorch or the tokenizer libraries with the catch-all's
    TypeError or RuntimeError naming their arguments. Each is refused in one line saying what to do; the files
    Python itself opens (prompts, results, a GGUF file) keep working under such names."""
    import shutil

    odd = tmp_path / "m\udcff"  # the bytes "m\xff"
    shutil.copytree(ckpt, odd)
    proc = run_proc("--ckpt_dir", odd, "--prompt", "Hi", *BASE)
    assert_one_line_error(proc.returncode, proc.stderr, 2, f"--ckpt_dir {tmp_path}/m\\xff has a name that is not "
                          "UTF-8", "reach it through a link with a UTF-8 name (ln -s)")
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--tokenizer_path", odd / "tokenizer.model", "--prompt", "Hi",
                           *BASE)
    assert_one_line_error(code, err, 2, f"tokenizer file {tmp_path}/m\\xff/tokenizer.model has a name that is not")
    code, _, err = run_cli(capsys, "perplexity", "--ckpt_dir", odd, "--text_file", odd / "params.json")
    assert_one_line_error(code, err, 2, "has a name that is not UTF-8")
    code, _, err = run_cli(capsys, "reshard", "--ckpt_dir", ckpt, "--out", tmp_path / "o\udcff", "--shards", "1")
    assert_one_line_error(code, err, 2, f"--out {tmp_path}/o\\xff has a name that is not UTF-8")
    assert not (tmp_path / "o\udcff").exists()
    (tmp_path / "hf\udcff").mkdir()
    code, _, err = run_cli(capsys, "convert", "--src", tmp_path / "hf\udcff", "--out", tmp_path / "o")
    assert_one_line_error(code, err, 2, f"--src {tmp_path}/hf\\xff has a name that is not UTF-8")

    (tmp_path / "p\udcff.txt").write_text("Hi\n")  # opened by Python: fine
    out = tmp_path / "r\udcff.jsonl"
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", tmp_path / "p\udcff.txt", "--output",
                           "jsonl", "--output_file", out, *BASE)
    assert code == 0 and json.loads(out.read_text())["prompt"] == "Hi", err


def test_jsonl_results_stay_one_line_for_every_reader(tmp_path):
    """Found by scripts/fuzz_processes.py: a random model generated NEL (U+0085), which JSON leaves raw in a string,
    and a reader splitting our JSONL with Python's str.splitlines cut the result in two (U+2028 and U+2029 alike,
    for JavaScript's readers too). They are escaped: each result one line by any reader's rule, the values as they
    were, and --resume takes the file back."""
    from llama_cli.prompts import PromptRequest, Result, ResultWriter, scan_output
    from llama_cli.settings import Settings

    odd = "a\x85b\u2028c\u2029d \u00e9\u4e2d\n\r\x1c"
    requests = [PromptRequest(i, f"p{i} {odd}", Settings(), id=f"id {odd}") for i in range(3)]
    path = tmp_path / "out.jsonl"
    w = ResultWriter("jsonl", None, str(path), False, [0, 1, 2])
    for r in requests:
        w.add(Result(r, generation=f"g{r.index} {odd}", finish_reason="length"))
    w.close()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3  # str.splitlines breaks at NEL, U+2028, U+2029, \x1c too
    assert "\u00e9\u4e2d" in text  # other characters stay as they are (UTF-8, not escaped)
    got = [json.loads(line) for line in text.splitlines()]
    assert [(g["id"], g["prompt"], g["generation"]) for g in got] == \
        [(f"id {odd}", f"p{i} {odd}", f"g{i} {odd}") for i in range(3)]
    assert scan_output(str(path), requests) == {0, 1, 2}


def test_a_full_disk_while_writing_results(capsys, ckpt, tmp_path):
    """Found with /dev/full: a full disk under --output_file was the catch-all's "OSError: [Errno 28] ...", and
    closing the file failed again over it. Now one line that says the results written before are kept and
    --resume goes on from them (a result cut off in the middle is dropped by --resume, as after a kill)."""
    import errno

    from llama_cli.errors import RuntimeFailure
    from llama_cli.prompts import PromptRequest, Result, ResultWriter
    from llama_cli.settings import Settings

    path = tmp_path / "out.jsonl"
    w = ResultWriter("jsonl", None, str(path), False, [0, 1, 2])

    class FillsUp:  # the file, whose disk fills up on the third result
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, text):
            self.n += 1
            if self.n == 3:
                self.f.write(text[:10])
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    w.file = FillsUp(w.file)
    for i in range(2):
        w.add(Result(PromptRequest(i, f"p{i}", Settings()), generation="g", finish_reason="length"))
    with pytest.raises(RuntimeFailure, match=r"cannot write to --output_file .*out.jsonl: No space left on "
                       r"device; the 2 result\(s\) written before are kept: free some space, then rerun with --resume"):
        w.add(Result(PromptRequest(2, "p2", Settings()), generation="g", finish_reason="length"))
    w.close()  # the failed write is not reported twice
    assert [r["index"] for r in jsonl(path.read_text().rsplit("\n", 1)[0])] == [0, 1]

    # a pipe (--output_file >(command)) whose reader ended: nothing there to resume from, and it says so
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    w = ResultWriter("jsonl", None, str(fifo), False, [0, 1])
    w.add(Result(PromptRequest(0, "p0", Settings()), generation="g", finish_reason="length"))
    os.close(reader)
    with pytest.raises(RuntimeFailure, match=r"fifo: Broken pipe \(after 1 result\(s\)\); whatever reads it stopped"):
        w.add(Result(PromptRequest(1, "p1", Settings()), generation="g", finish_reason="length"))
    w.close()

    if os.path.exists("/dev/full"):  # Linux: a device that is always full, as output file and as standard output
        code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file",
                               "/dev/full", *BASE)
        assert_one_line_error(code, err, 1, "cannot write to --output_file /dev/full: No space left on device "
                              "(after 0 result(s))")
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "llama_cli", "--ckpt_dir", str(ckpt), "--prompt", "Hi",
                                   *BASE], stdout=full, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        assert_one_line_error(proc.returncode, proc.stderr, 1, "cannot write the results to standard output: "
                              "No space left on device")


def test_two_runs_on_one_output_file(capsys, ckpt, tmp_path):
    """Two runs appending to one --output_file (two shell jobs started by mistake) would each answer every prompt,
    and --resume would then find results twice: a second run is refused while the first holds the file, before
    its model loads. The lock follows the file that --resume's clean-up puts in its place."""
    from llama_cli.prompts import OutputLock

    out = tmp_path / "out.jsonl"
    first = OutputLock(str(out))  # another run, writing it now (flock: per open file, so one process will do)
    for extra in ([], ["--resume"]):
        code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file",
                               out, *extra, *BASE)
        assert_one_line_error(code, err, 2, f"--output_file {out} is being written by another llama-cli run now; "
                              "wait for it to end (then --resume), or choose another file")
        assert "loaded" not in err
    first.release()  # that run ended
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--prompt", "Yo", "--output", "jsonl",
                           "--output_file", out, *BASE)
    assert code == 0, err
    # --resume's clean-up replaces the file (dropping a cut last line): the lock moves to the new one
    out.write_bytes(out.read_bytes() + b'{"index": 1, "pro')
    from llama_cli.errors import UserError
    from llama_cli.prompts import PromptRequest, scan_output
    from llama_cli.settings import Settings

    lock = OutputLock(str(out))
    old = os.stat(out).st_ino
    scan_output(str(out), [PromptRequest(0, "Hi", Settings()), PromptRequest(1, "Yo", Settings())])
    assert os.stat(out).st_ino != old
    lock.follow()
    with pytest.raises(UserError, match="is being written by another llama-cli run"):
        OutputLock(str(out))
    lock.release()
    OutputLock(str(out)).release()


def test_a_closed_standard_output(capsys, ckpt, tmp_path, monkeypatch):
    """Found by hand: `llama-cli ... >&-` (standard output closed) exited 0 with every completion dropped (Python
    prints nothing to a closed stdout); chat failed with the catch-all's AttributeError; perplexity's last line was
    lost. Each now stops in one line before any work, unless the results go to --output_file."""
    proc = subprocess.run([sys.executable, "-m", "llama_cli", "--ckpt_dir", str(ckpt), "--prompt", "Hi", *BASE],
                          capture_output=False, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=120, preexec_fn=lambda: os.close(1))
    assert_one_line_error(proc.returncode, proc.stderr, 2, "standard output is closed, so the results would go "
                          "nowhere; give --output_file, or run with standard output open")
    monkeypatch.setattr(sys, "stdout", None)
    out = tmp_path / "out.jsonl"
    assert cli(["--ckpt_dir", str(ckpt), "--prompt", "Hi", "--output", "jsonl", "--output_file", str(out), *BASE]) == 0
    assert jsonl(out.read_text())[0]["prompt"] == "Hi"  # the file has them
    capsys.readouterr()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 20)
    for argv, what in ((["chat", "--ckpt_dir", str(ckpt)], "the replies"),
                       (["perplexity", "--ckpt_dir", str(ckpt), "--text_file", str(text)], "the perplexity")):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert_one_line_error(2, err, 2, f"standard output is closed, so {what} would go nowhere")
        assert "loaded" not in err


def test_unwritable_output_file(capsys, ckpt, tmp_path):
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output_file",
                           tmp_path / "no" / "such" / "dir.jsonl", *BASE)
    assert_one_line_error(code, err, 2, "cannot write --output_file")


def test_world_size_the_heads_do_not_divide(ckpt):
    proc = run_proc("--ckpt_dir", ckpt, "--prompt", "Hi", *BASE, env={"WORLD_SIZE": "3", "RANK": "0"})
    assert_one_line_error(proc.returncode, proc.stderr, 2, "cannot be split over 3", "1, 2, 4")
    other = run_proc("--ckpt_dir", ckpt, "--prompt", "Hi", *BASE, env={"WORLD_SIZE": "3", "RANK": "2"})
    assert other.returncode == 2 and "error" not in other.stderr  # said once, by rank 0


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 makes this one of 2 processes, but MASTER_ADDR and MASTER_PORT "
     "(where they meet) are not set: launch with torchrun --nproc_per_node 2 -m llama_cli ..., or unset WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "but MASTER_PORT (where they meet) is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not one of the 2 process(es) of WORLD_SIZE=2, ranks 0 to 1"),
    ({"RANK": "1"}, "RANK=1 is not one of the 1 process(es) of WORLD_SIZE (unset: 1)"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a world needs at least 1 process"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE, RANK and LOCAL_RANK must be integers"),
])
def test_a_launch_that_is_not_torchruns(capsys, ckpt, monkeypatch, env, needle):
    """Found by hand: WORLD_SIZE=2 left in a job script's environment failed with the catch-all's "ValueError: Error
    initializing torch.distributed using env:// rendezvous..."; WORLD_SIZE=0 with ZeroDivisionError; a stray RANK=1
    exited 2 saying nothing (rank 0 alone speaks). Each is now one line, said by whichever process meets it."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", *BASE)
    assert_one_line_error(code, err, 2, needle)


@pytest.mark.parametrize("command", ["convert", "quantize", "reshard"])
def test_folder_writing_commands_refuse_a_world_of_several(capsys, ckpt, tmp_path, monkeypatch, command):
    """Found by hand: `torchrun --nproc_per_node 2 -m llama_cli reshard ...` had both processes write the one --out
    folder; the second was refused by its lock (exit 2, saying nothing: not rank 0) and torchrun then killed the
    first mid-write. These commands now refuse a world of several before any work: rank 0 says so under torchrun,
    every rank where WORLD_SIZE is a stray (no MASTER_ADDR)."""
    flags = {"convert": ["--src", str(ckpt)], "quantize": ["--ckpt_dir", str(ckpt), "--mode", "int8"],
             "reshard": ["--ckpt_dir", str(ckpt), "--shards", "1"]}[command]
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, master, says in (("0", "127.0.0.1", True), ("1", "127.0.0.1", False), ("1", None, True)):
        monkeypatch.setenv("RANK", rank)
        if master:
            monkeypatch.setenv("MASTER_ADDR", master)
        else:
            monkeypatch.delenv("MASTER_ADDR", raising=False)
        code, _, err = run_cli(capsys, command, *flags, "--out", str(tmp_path / "out"))
        if says:
            assert_one_line_error(code, err, 2, f"llama-cli {command} runs in one process (it reads and writes whole "
                                  "checkpoints), and WORLD_SIZE=2 makes this one of several: run it without torchrun")
        else:
            assert code == 2 and err == ""
        assert not (tmp_path / "out").exists()


def test_a_process_waiting_for_the_others_says_where(ckpt):
    """One of two processes started with the meeting point set but without its peer waits (torch's default
    timeout): it says for whom and where, so a user whose other node never started knows what it waits for."""
    from helpers import free_port

    port = free_port()
    env = {**subprocess_env(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "llama_cli", "--ckpt_dir", str(ckpt), "--prompt", "Hi", *BASE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    seen = []
    try:
        while not seen or ("waiting for" not in seen[-1] and seen[-1]):  # then it blocks; "" is the end of its output
            seen.append(proc.stderr.readline())
    finally:
        proc.kill()
        proc.wait()
    assert seen[-1].strip() == f"llama-cli: waiting for the other 1 process(es) at 127.0.0.1:{port} (gloo)", seen
    assert not any("loaded" in line for line in seen)  # before any weight is read


def test_torchrun_with_a_count_the_heads_do_not_divide_says_it_once(ckpt):
    p = torchrun("--ckpt_dir", ckpt, "--prompt", "Hi", *BASE, launcher_args=["--standalone", "--nproc_per_node", "3"])
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert err.count("llama-cli: error: this model cannot be split over 3 processes") == 1, err
    first = err.index("llama-cli: error:")
    assert "Traceback" not in err[:first]  # our line comes before torchrun's report


def test_subprocess_error_has_no_traceback_and_debug_shows_it(tmp_path):
    proc = run_proc("--ckpt_dir", tmp_path / "none", "--prompt", "Hi")
    assert_one_line_error(proc.returncode, proc.stderr, 2, "does not exist")
    proc = run_proc("--ckpt_dir", tmp_path / "none", "--prompt", "Hi", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


# --- torchrun ------------------------------------------------------------------------------------------

def torchrun(*args, launcher_args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "llama_cli", *map(str, args)]
    return subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_torchrun_two_processes(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "two", spm_path, TINY, n_shards=2)
    args = ["--ckpt_dir", folder, "--prompt", "Hello world", "--prompt", "The cat", "--output", "jsonl", *BASE]
    p = torchrun(*args, launcher_args=["--standalone", "--nproc_per_node", "2"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    single = run_proc(*args)
    recs = jsonl(out)
    assert len(recs) == 2  # only rank 0 prints
    assert recs == jsonl(single.stdout)
    assert "initializing model parallel" in err
    assert "KV cache 2 x 64 positions" in err  # every rank has the --prompt texts: a row each, not 4
    p = torchrun(*args, "--quiet", launcher_args=["--standalone", "--nproc_per_node", "2"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and jsonl(out) == recs
    assert "initializing model parallel" not in err and "llama-cli:" not in err  # --quiet: fairscale's lines too


def test_torchrun_stops_cleanly_when_standard_output_is_closed(tmp_path, spm_path):
    """Found by hand: `torchrun ... -m llama_cli --prompts_file p.txt | head -1` stopped rank 0 (exit 0, as one
    process does) while the other ranks went on and failed at their next collective ("Connection closed by peer"),
    torchrun exiting 1 with its report. Rank 0 now tells the others at the same result, and all stop there."""
    folder, _ = make_model_folder(tmp_path / "two", spm_path, TINY, n_shards=2)
    f = tmp_path / "p.txt"
    f.write_text("".join(f"Prompt number {i} says hello\n" for i in range(30)))
    p = torchrun("--ckpt_dir", folder, "--prompts_file", f, "--output", "jsonl", "--max_batch_size", "1",
                 "--max_seq_len", "128", "--max_gen_len", "40", "--temperature", "0",
                 launcher_args=["--standalone", "--nproc_per_node", "2"])
    assert json.loads(p.stdout.readline())["index"] == 0
    p.stdout.close()  # as `head -1` does once it has its line
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0, err[-3000:]
    assert "30 prompt(s)" not in err and "Connection closed" not in err and "error" not in err.lower()


def test_two_launchers_multi_node_on_loopback(tmp_path, spm_path):
    from helpers import free_port

    folder, _ = make_model_folder(tmp_path / "mn", spm_path, TINY, n_shards=2)
    args = ["--ckpt_dir", folder, "--prompt", "Hello world", "--output", "jsonl", *BASE]
    port = free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
              f"127.0.0.1:{port}", "--rdzv_id", "llama-cli-test"]
    nodes = [torchrun(*args, launcher_args=common + ["--node_rank", str(r)]) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    single = run_proc(*args)
    printed = [jsonl(out) for out, _ in outs]
    assert sorted(len(x) for x in printed) == [0, 1]  # exactly one node (global rank 0) prints
    assert [x for x in printed if x][0] == jsonl(single.stdout)


# --- defects found on a newcomer's path (issue 10) ----------------------------------------------------

def test_help_shows_every_flag_with_its_whole_text():
    proc = run_proc("--help")
    assert proc.returncode == 0
    from llama_cli.config import RunConfig
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        assert f"--{f.name}" in proc.stdout, f.name
    assert not re.search(r"(?m)^\s+-(?!q, --quiet\n)[a-z], --", proc.stdout)  # no one-letter flags but -q (--quiet)
    text = " ".join(proc.stdout.split())
    assert "static (Meta's way, where each batch runs until its longest completion ends)" in text
    # fire's help cuts a text at a line that looks like "name: ..." (a colon): every flag's text runs to its end
    flags = proc.stdout.split("\nFLAGS\n", 1)[1].split("\nVALUES\n")[0]
    for block in re.split(r"\n(?=    -)", flags):
        lines = [ln.strip() for ln in block.splitlines()
                 if ln.strip() and not ln.strip().startswith(("Type:", "Default:"))]
        assert " ".join(lines[1:]).endswith((".", ")")), lines[0]
    assert "cuda_graphs" in text and "min_p" in text
    from llama_cli.cli import _subcommands

    for name in _subcommands():  # every subcommand is named in the main help
        assert f"llama-cli {name} --" in text, name


def test_help_reads_as_a_users_text_with_required_flags_marked(capsys):
    """Every command's --help: no Python quoting or fire's "VALUE" choices (RunConfig's flags listed again as if
    they were values), and each flag the command cannot run without says "Required", not "Default: None"."""
    from llama_cli.cli import _subcommands
    from llama_cli.flags import REQUIRED

    for command in ["", *_subcommands()]:
        name = f"llama-cli {command}".strip()
        code, out, _ = run_cli(capsys, *([command] if command else []), "--help")
        assert code == 0
        for wart in ("VALUE", "Optional[]", "Optional['", "<factory>", "Type: '", "Default: '", f"'{name}'"):
            assert wart not in out, (name, wart)
        assert f"SYNOPSIS\n    {name} <flags>" in out
        blocks = {re.match(r"\s*(?:-q, )?--(\w+)", b).group(1): b
                  for b in re.split(r"\n(?=    -)", out.split("\nFLAGS\n")[1])}
        assert REQUIRED[name] and set(REQUIRED[name]) <= set(blocks), name
        for flag, block in blocks.items():
            required = flag in REQUIRED[name]
            assert ("\n        Required\n" in block) == required, (name, flag)
            assert ("Default:" in block) != required, (name, flag)
            assert "Optional" not in block or not required, (name, flag)
            head = block.strip().splitlines()[0]
            if re.search(r"Default: (True|False)\n", block):  # a switch, shown as given: --echo, --noshare_prefixes
                assert "=" not in head and (("--no" in head) == ("Default: True" in block)), (name, head)
            else:
                assert head == f"--{flag}={flag.upper()}", (name, head)
        if "quiet" in blocks:
            assert "-q, --quiet\n" in out, name


def test_each_required_flag_is_required(capsys, ckpt, tmp_path):
    """What --help marks required is what each command asks for: left out alone, the error names it."""
    from llama_cli.flags import REQUIRED

    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n")
    given = {"ckpt_dir": ckpt, "out": tmp_path / "new", "mode": "int8", "shards": 1, "src": ckpt,
             "text_file": text}
    for name, flags in REQUIRED.items():
        command = name.split()[1:]
        for missing in flags:
            args = [a for f in flags if f != missing for a in (f"--{f}", given[f])]
            code, _, err = run_cli(capsys, *command, *args)
            assert code == 2 and f"--{missing}" in err, (name, missing, err)
            assert not (tmp_path / "new").exists()


def test_version(capsys):
    from llama_cli import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"llama-cli {__version__}"


def test_summary_keeps_compile_time_out_of_the_rate():
    from llama_cli.cli import summary
    from llama_cli.scheduler import Stats

    line = summary(Stats(prompts=1, tokens=128, first_token_s=45.0), gen_s=48.45, warmup_s=45.0, load_s=1.0)
    assert "128 tokens in 48.45 s: 37.1 tokens/s generating" in line
    assert "first token after 45.00 s" in line and "compiling/capturing the decode step 45.00 s" in line


def test_interrupt_message_names_the_output_file_only_when_there_is_one(capsys, monkeypatch, ckpt, tmp_path):
    import llama_cli.cli as cli_mod

    def interrupted(cfg, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "run", interrupted)
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi")
    assert code == 130 and "--output_file" not in err and "interrupted" in err
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--output", "jsonl", "--output_file",
                           tmp_path / "o.jsonl")
    assert code == 130 and "--output_file are kept" in err


def test_json_error_message_reads_well(capsys, ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "unterminated\n')
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, *BASE)
    assert_one_line_error(code, err, 2, "line 1 is not valid JSON (Unterminated string starting at, column 12)")
    words = err.split()
    assert not any(a == b for a, b in zip(words, words[1:])), err  # no "at at"


def test_ckpt_dir_that_needs_converting(capsys, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    code, _, err = run_cli(capsys, "--ckpt_dir", gguf, "--prompt", "Hi", "--tokenizer_path", gguf)
    assert_one_line_error(code, err, 2, "is a GGUF file", f"llama-cli convert --src {gguf} --out checkpoints/model")
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "--ckpt_dir", hf, "--prompt", "Hi", "--tokenizer_path", gguf)
    assert_one_line_error(code, err, 2, "HuggingFace model folder", f"llama-cli convert --src {hf}")


def test_json_prompts_file_and_jsonl_on_stdin(capsys, ckpt, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["Hello world", {"prompt": "The cat", "id": "c", "max_gen_len": 2}]))
    code, out, _ = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, "--output", "jsonl", *BASE)
    recs = jsonl(out)
    assert code == 0 and [r["prompt"] for r in recs] == ["Hello world", "The cat"]
    assert recs[1]["id"] == "c" and len(recs[1]["tokens"]) <= 2
    lines = '{"prompt": "Hello world", "id": 1}\n{"prompt": "The cat", "max_gen_len": 2}\n'
    proc = run_proc("--ckpt_dir", ckpt, "--output", "jsonl", *BASE, stdin=lines)
    assert proc.returncode == 0, proc.stderr
    recs2 = jsonl(proc.stdout)
    assert [r["prompt"] for r in recs2] == ["Hello world", "The cat"] and recs2[0]["id"] == 1
    assert recs2[0]["tokens"] == recs[0]["tokens"] and recs2[1]["tokens"] == recs[1]["tokens"]
    f.write_text(json.dumps({"prompt": "not an array"}))
    code, _, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompts_file", f, *BASE)
    assert_one_line_error(code, err, 2, "must hold a JSON array")


def test_logprobs_need_jsonl(capsys, ckpt):
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hi", "--logprobs", *BASE)
    assert_one_line_error(code, err, 2, "--logprobs", "--output jsonl")


@pytest.mark.parametrize("schedule", ["static", "continuous"])
def test_generation_cut_by_max_seq_len_warns_once(capsys, ckpt, schedule):
    code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hello world", "--prompt", "The cat",
                             "--max_seq_len", "24", "--max_gen_len", "64", "--temperature", "0", "--output", "jsonl",
                             "--schedule", schedule)
    recs = jsonl(out)
    assert code == 0, err
    cut = [r for r in recs if r["finish_reason"] == "max_seq_len"]
    assert cut and all(len(r["tokens"]) < 64 for r in cut)
    assert err.count("ran into --max_seq_len") == 1 and f"{len(cut)} of 2 prompts" in err


def test_threads_flag(capsys, ckpt, tmp_path, keep_threads):
    """--threads N: the process computes on N threads (the load line says so) with the default's tokens; chat
    and perplexity take it too, and refuse a bad value in one line before loading anything."""
    import torch

    runs = {}
    for threads in (None, 1):
        flag = ["--threads", threads] if threads else []
        code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hello world", *BASE, "--output", "jsonl",
                                 *flag)
        assert code == 0, err
        runs[threads] = json.loads(out)["tokens"]
    assert "on cpu (1 thread) as float32" in err and torch.get_num_threads() == 1
    assert runs[1] == runs[None] and len(runs[1]) > 0
    torch.set_num_threads(2)
    (tmp_path / "t.txt").write_text("The cat sat on the mat. " * 8)
    code, out, err = run_cli(capsys, "perplexity", "--ckpt_dir", ckpt, "--text_file", tmp_path / "t.txt",
                             "--threads", "1", "--ctx", "32")
    assert code == 0 and out.startswith("perplexity: ") and torch.get_num_threads() == 1, err
    for cmd in (["chat"], ["perplexity", "--text_file", tmp_path / "t.txt"], ["compile"]):
        code, out, err = run_cli(capsys, *cmd, "--ckpt_dir", ckpt, "--threads", "-3")
        assert_one_line_error(code, err, 2, "--threads must be an integer from 1 to ")
        assert "loaded" not in err


def test_threads_past_the_cpus_of_a_torchrun_machine_are_warned_about(ckpt, monkeypatch, caplog, keep_threads):
    """Processes that torchrun started on one machine (LOCAL_WORLD_SIZE), computing on the CPU: more threads
    together than the machine's CPUs get a warning naming the --threads that fits; as many do not, nor one
    thread each (more processes than CPUs is the launch's choice: --threads cannot help)."""
    from llama_cli import Llama, devices

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(devices, "usable_cpus", lambda: 4)
    monkeypatch.setattr(devices, "cpu_quota", lambda: None)  # (a CI container's own quota left out)
    tok = str(ckpt / "tokenizer.model")
    for threads, warned in ((3, True), (2, False), (1, False)):
        if threads == 1:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        caplog.clear()
        with caplog.at_level("WARNING", logger="llama_cli"):
            Llama.build(str(ckpt), tok, 32, 1, threads=threads)
        said = [r.getMessage() for r in caplog.records if "threads each" in r.getMessage()]
        assert said == (["2 processes on this machine x 3 threads each is more threads than its 4 CPUs, which "
                         "slows every step; use --threads 2"] if warned else []), said
    monkeypatch.setenv("LOCAL_RANK", "1")  # said once a machine: by its first process
    caplog.clear()
    with caplog.at_level("WARNING", logger="llama_cli"):
        Llama.build(str(ckpt), tok, 32, 1, threads=3)
    assert not [r for r in caplog.records if "threads each" in r.getMessage()]


def test_cpu_quota_of_a_container(tmp_path):
    """A container's CPU quota read from its cgroup (v2 cpu.max, else v1's cfs files), rounded up to whole
    CPUs; none where unlimited, unreadable or malformed."""
    from llama_cli.devices import cpu_quota

    def root(files):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
        return str(d)

    assert cpu_quota(root({"cpu.max": "200000 100000\n"})) == 2
    assert cpu_quota(root({"cpu.max": "150000 100000\n"})) == 2  # 1.5 CPUs of time: two threads
    assert cpu_quota(root({"cpu.max": "max 100000\n"})) is None
    assert cpu_quota(root({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"})) == 1
    assert cpu_quota(root({"cpu,cpuacct/cpu.cfs_quota_us": "400000", "cpu,cpuacct/cpu.cfs_period_us": "100000"})) == 4
    assert cpu_quota(root({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})) is None
    assert cpu_quota(root({"cpu.max": "lots\n"})) is None and cpu_quota(root({})) is None


def test_default_threads_follow_a_container_quota(ckpt, monkeypatch, caplog, keep_threads):
    """With neither --threads nor OMP_NUM_THREADS, a container's quota below PyTorch's default thread count
    (one per host core, all of which a container sees) becomes the thread count, said in a log line; either
    setting overrides it."""
    import torch

    from llama_cli import Llama, devices

    tok = str(ckpt / "tokenizer.model")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "cpu_quota", lambda: 1)
    monkeypatch.setattr(devices, "_DEFAULT_THREADS", {})  # PyTorch's count taken afresh: the 2 set here
    torch.set_num_threads(2)
    with caplog.at_level("INFO", logger="llama_cli"):
        Llama.build(str(ckpt), tok, 32, 1)
    assert torch.get_num_threads() == 1
    assert "1 thread(s): this container's CPU quota (--threads overrides)" in caplog.text
    torch.set_num_threads(2)
    Llama.build(str(ckpt), tok, 32, 1, threads=2)  # asked for: kept
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    Llama.build(str(ckpt), tok, 32, 1)  # the environment's choice: kept
    assert torch.get_num_threads() == 2


def test_kv_cache_dtype_flag(capsys, ckpt):
    """--kv_cache_dtype bf16: the load line says the cache's type, the run completes with the same tokens as the
    fp32 cache's on this model (the rounding's effect on its logits is tested in test_cpu_step.py), and chat takes
    the flag too."""
    runs = {}
    for kv in ("auto", "bf16"):
        code, out, err = run_cli(capsys, "--ckpt_dir", ckpt, "--prompt", "Hello world", *BASE, "--output", "jsonl",
                                 "--kv_cache_dtype", kv)
        assert code == 0, err
        assert ("KV cache 1 x 64 positions in bfloat16," in err) == (kv == "bf16"), err
        runs[kv] = json.loads(out)["tokens"]
    assert runs["bf16"] == runs["auto"] and len(runs["auto"]) > 0
    code, _, err = run_cli(capsys, "chat", "--ckpt_dir", ckpt, "--kv_cache_dtype", "fp8")
    assert code == 2 and "--kv_cache_dtype must be auto, fp32, bf16 or fp16, got 'fp8'" in err
