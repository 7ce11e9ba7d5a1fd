"""`llama-cli perplexity` against HF transformers' loss on the same weights and text."""

import json
import math
import re

import pytest
import torch

from helpers import TINY, corpus, make_model_folder, to_hf
from llama_cli.cli import cli
from llama_cli.perplexity import windows


def hf_perplexity(model, ids, ctx, stride):
    """HF's sliding-window recipe (transformers docs, "Perplexity of fixed-length models"), summing the
    loss of every scored token."""
    ids = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + ctx, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("ctx,stride,batch", [(64, 64, 1), (64, 32, 3), (50, 17, 2)])
def test_perplexity_equals_hf(tmp_path, spm_path, capsys, ctx, stride, batch):
    folder, weights = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6)
    text = " ".join(corpus(60, seed=3))
    (tmp_path / "t.txt").write_text(text)
    code = cli(["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"), "--ctx", str(ctx),
                "--stride", str(stride), "--max_batch_size", str(batch), "--output", "jsonl"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    from llama_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(folder / "tokenizer.model")
    ids = tok.encode(text, bos=True, eos=False)
    hf = to_hf(TINY, weights, tok.n_words)
    want, count = hf_perplexity(hf, ids, ctx, stride)
    assert res["tokens"] == count
    if stride < ctx:
        assert count == len(ids) - 1  # overlapping windows: every token after the first is scored
    assert abs(res["perplexity"] - want) / want < 1e-3, (res["perplexity"], want)
    assert "windows" in err  # progress on stderr
    code = cli(["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"), "--ctx", str(ctx),
                "--stride", str(stride), "--quiet"])
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"perplexity: {res['perplexity']:.4f}" and err == ""


def test_windows_cover_every_token_once():
    for n, ctx, stride in [(100, 30, 7), (31, 30, 29), (5, 30, 30), (100, 30, 29)]:
        scored = [p for _, e, first in windows(n, ctx, stride) for p in range(first, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= ctx for b, e, _ in windows(n, ctx, stride))
    # disjoint windows (stride = ctx): each window's first token has no context inside it
    scored = [p for _, e, first in windows(100, 30, 30) for p in range(first, e)]
    assert scored == [p for p in range(100) if p % 30]


@pytest.mark.parametrize("args,needle", [
    (["--ctx", "1"], "--ctx must be an integer >= 2"), (["--stride", "900"], "larger than --ctx"),
    (["--stride", "0"], "--stride must be an integer >= 1, got 0"), (["--text_file", "/"], "is a folder"),
    (["--text_file", "/nonexistent.txt"], "does not exist"), (["--output", "xml"], "--output"),
    (["--max_seq_len", "64"], "unknown flag --max_seq_len; did you mean --ctx? see llama-cli perplexity --help"),
    # llama.cpp's llama-perplexity -m MODEL -f FILE; -s was --stride here, read from a seed's 42 without a word
    (["-m", "model.gguf"], "unknown flag -m; did you mean --ckpt_dir?"), (["-f", "t.txt"], "did you mean --text_file?"),
    (["-s", "42"], "unknown flag -s; did you mean --stride?"),
    (["--group_size", "32"], "--group_size goes with --quantize int8 or int4"),
    (["--quantize", "int2"], "--quantize must be int8 or int4, got 'int2'"),
])
def test_perplexity_bad_input(tmp_path, spm_path, capsys, args, needle):
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    (tmp_path / "t.txt").write_text("hello world")
    argv = ["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"), *args]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_folder_to_convert_is_named_before_the_tokenizer(tmp_path, capsys):
    """An HF folder (or a GGUF file) as --ckpt_dir: perplexity says to convert it, as every other command does; it
    used to look for the tokenizer first ("tokenizer file ... does not exist")."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "t.txt").write_text("hello world")
    assert cli(["perplexity", "--ckpt_dir", str(tmp_path / "hf"), "--text_file", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "is a HuggingFace model folder (config.json), not a Meta checkpoint; convert it first" in err, err


def test_text_from_a_pipe(tmp_path, spm_path, capsys):
    """--text_file <(command): a pipe scores as the same text in a file does (it used to be refused)."""
    import os
    import threading

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    text = " ".join(corpus(20, seed=4))
    (tmp_path / "t.txt").write_text(text)
    os.mkfifo(tmp_path / "pipe")
    threading.Thread(target=lambda: (tmp_path / "pipe").write_text(text), daemon=True).start()
    results = []
    for source in ("pipe", "t.txt"):
        assert cli(["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / source), "--ctx", "32",
                    "--quiet"]) == 0
        results.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert results[0] == results[1] and results[0].startswith("perplexity: ")


def test_cache_rows_follow_the_windows(tmp_path, spm_path, capsys, monkeypatch):
    """In one process the KV cache holds as many rows as the text has windows, at most --max_batch_size: a
    short text scored with the default batch of 4 allocates one row; the perplexity is the same either way."""
    from helpers import spy_cache_rows

    import llama_cli.generation
    import llama_cli.tokenizer

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6)
    rows = spy_cache_rows(monkeypatch)
    loads = []  # the tokenizer is read once per run, though needed before the model is built
    real_load = llama_cli.tokenizer.load_tokenizer
    for module in (llama_cli.tokenizer, llama_cli.generation):
        monkeypatch.setattr(module, "load_tokenizer", lambda path: loads.append(path) or real_load(path))
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(" ".join(corpus(3, seed=3)))
    long.write_text(" ".join(corpus(60, seed=3)))
    got = {}
    for text, ctx, batch in ((short, "512", "4"), (long, "64", "2"), (long, "64", "64")):
        code = cli(["perplexity", "--ckpt_dir", str(folder), "--text_file", str(text), "--ctx", ctx,
                    "--max_batch_size", batch, "--output", "jsonl", "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, err
        got[(text.name, batch)] = json.loads(out)
    windows_long = got[("long.txt", "64")]["windows"]
    assert got[("short.txt", "4")]["windows"] == 1 and 2 < windows_long < 64
    assert rows == [1, 2, windows_long]
    assert len(loads) == 3
    assert got[("long.txt", "2")]["perplexity"] == pytest.approx(got[("long.txt", "64")]["perplexity"], rel=1e-5)


def test_cache_positions_follow_the_text(tmp_path, spm_path, capsys, monkeypatch):
    """A --ctx longer than the text allocates a cache for the text, not for --ctx (--ctx 10**8 used to be refused
    for memory on a short text); the memory check's message names perplexity's flags."""
    import llama_cli.memory

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6)
    (tmp_path / "t.txt").write_text(" ".join(corpus(8, seed=3)))
    argv = ["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"), "--output", "jsonl"]
    results, positions = [], []
    for ctx in ("100000000", "512"):
        assert cli([*argv, "--ctx", ctx]) == 0
        out, err = capsys.readouterr()
        results.append(json.loads(out))
        positions.append(int(re.search(r"KV cache 1 x (\d+) positions", err).group(1)))
    tokens = results[0]["text_tokens"]
    assert 300 < tokens < 512 and tokens <= positions[0] == positions[1] < 512  # (rounded up to a length bucket)
    assert results[0]["perplexity"] == results[1]["perplexity"]
    monkeypatch.setattr(llama_cli.memory, "kv_cache_bytes", lambda *a, **k: 10**15)
    assert cli([*argv, "--ctx", "64"]) == 2
    err = capsys.readouterr().err
    assert "lower --max_batch_size or --ctx (e.g." in err and "ctx=" in err and "max_seq_len" not in err, err


def test_perplexity_with_a_half_width_kv_cache(tmp_path, spm_path, capsys):
    """--kv_cache_dtype holds the windows' cache in half the bytes; each window is one prefill attending over its
    own keys and values as computed, so the scores do not change."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6)
    (tmp_path / "t.txt").write_text(" ".join(corpus(60, seed=3)))
    argv = ["perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"), "--ctx", "64",
            "--stride", "32", "--output", "jsonl"]
    got = {}
    for kind in ("auto", "bf16", "fp16"):
        assert cli([*argv, "--kv_cache_dtype", kind]) == 0
        out, err = capsys.readouterr()
        got[kind] = json.loads(out)["perplexity"]
        named = {"bf16": "positions in bfloat16", "fp16": "positions in float16"}.get(kind)
        assert (named in err) if named else "positions in" not in err
    assert got["bf16"] == got["auto"] == got["fp16"]
    assert cli([*argv, "--kv_cache_dtype", "int8"]) == 2
    assert "--kv_cache_dtype must be auto, fp32, bf16 or fp16" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [["int8"], ["int4", "--group_size", "64"]])
def test_perplexity_quantized_at_load_is_that_of_the_quantized_copy(tmp_path, spm_path, capsys, mode):
    """--quantize scores the model as quantized at load: the loss quantizing costs without writing a copy. The
    same weights as `llama-cli quantize` writes, so the same perplexity; and not the unquantized one's."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6)
    (tmp_path / "t.txt").write_text(" ".join(corpus(60, seed=3)))
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "q"), "--mode", *mode]) == 0
    capsys.readouterr()
    got = {}
    for name, ckpt, more in (("plain", folder, []), ("at load", folder, ["--quantize", *mode]),
                             ("copy", tmp_path / "q", [])):
        assert cli(["perplexity", "--ckpt_dir", str(ckpt), "--text_file", str(tmp_path / "t.txt"), "--ctx", "64",
                    "--output", "jsonl", "--tokenizer_path", str(folder / "tokenizer.model"), *more]) == 0
        got[name] = json.loads(capsys.readouterr().out)["perplexity"]
    assert got["at load"] == pytest.approx(got["copy"], rel=1e-6)
    assert got["at load"] != got["plain"] and got["at load"] == pytest.approx(got["plain"], rel=0.1)


def test_perplexity_under_torchrun(tmp_path, spm_path):
    """Two processes (gloo, a checkpoint in two shards): rank 0 reads the text and sends it to the other; the
    same perplexity as one process, printed once."""
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=6, n_shards=2)
    (tmp_path / "t.txt").write_text(" ".join(corpus(40, seed=5)))
    args = ["-m", "llama_cli", "perplexity", "--ckpt_dir", str(folder), "--text_file", str(tmp_path / "t.txt"),
            "--ctx", "48", "--stride", "32", "--max_batch_size", "3", "--output", "jsonl", "--quiet"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args], env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args], env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads(two.stdout), json.loads(one.stdout)  # one line each: rank 0 alone prints
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"] > 1
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
