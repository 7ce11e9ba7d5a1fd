"""Chat: dialogs become the exact tokens of Meta's Llama 2 / Llama 3 formats and of transformers'
apply_chat_template; Llama.chat_completion, `llama-cli chat`, and dialogs in prompt files."""

import io
import json
import subprocess
import sys

import pytest

from helpers import REPO, TINY, make_model_folder, subprocess_env
from llama_cli import Llama
from llama_cli.chat import Llama2Format, Llama3Format, TemplateFormat, check_dialog, pick_format
from llama_cli.cli import cli
from llama_cli.errors import UserError
from llama_cli.tokenizer import load_tokenizer
from test_tokenizer import make_hf_tokenizer, write_tiktoken

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Always answer with Haiku"},
     {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello there  "},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": " Why did the cat sit on the computer? "},
     {"role": "user", "content": "Why?"}],
]


def meta_llama2_tokens(dialog, tok):
    """Meta's llama (v2) generation.py chat_completion, step by step as it is written there."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] \
            + dialog[2:]
    dialog_tokens = sum([tok.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                                    bos=True, eos=True) for prompt, answer in zip(dialog[::2], dialog[1::2])], [])
    return dialog_tokens + tok.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)


def meta_llama3_tokens(dialog, tok):
    """Meta's llama3 ChatFormat.encode_dialog_prompt."""
    sp = tok.specials

    def header(role):
        return [sp["<|start_header_id|>"]] + tok.encode(role, bos=False, eos=False) + [sp["<|end_header_id|>"]] \
            + tok.encode("\n\n", bos=False, eos=False)

    tokens = [sp["<|begin_of_text|>"]]
    for m in dialog:
        tokens += header(m["role"]) + tok.encode(m["content"].strip(), bos=False, eos=False) + [sp["<|eot_id|>"]]
    return tokens + header("assistant")


def test_llama2_format_is_metas(spm_path, llama2_tokenizer_or_tiny):
    tok = load_tokenizer(llama2_tokenizer_or_tiny)
    fmt = pick_format(tok, str(llama2_tokenizer_or_tiny))
    assert isinstance(fmt, Llama2Format)
    for d in DIALOGS:
        assert fmt.encode(check_dialog(d), tok) == meta_llama2_tokens(d, tok)


@pytest.fixture(params=["tiny", "meta"])
def llama2_tokenizer_or_tiny(request, spm_path):
    if request.param == "tiny":
        return spm_path
    return request.getfixturevalue("llama2_tokenizer")


def test_llama3_format_is_metas(tmp_path):
    path, _ = write_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(path)
    fmt = pick_format(tok, str(path))
    assert isinstance(fmt, Llama3Format)
    for d in DIALOGS:
        assert fmt.encode(check_dialog(d), tok) == meta_llama3_tokens(d, tok)


TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_template_format_is_transformers_apply_chat_template(tmp_path):
    from transformers import AutoTokenizer

    path = make_hf_tokenizer(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    cfg.update(chat_template=TEMPLATE, tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(path)
    fmt = pick_format(tok, str(path))
    assert isinstance(fmt, TemplateFormat)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for d in DIALOGS:
        want = hf.apply_chat_template(d, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert fmt.encode(check_dialog(d), tok) == list(want)


@pytest.mark.parametrize("dialog,needle", [
    ([], "non-empty list"),
    ([{"role": "user"}], '"content" text'),
    ([{"role": "robot", "content": "x"}], 'role "robot"'),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be the user's"),
    ([{"role": "system", "content": "s"}], "last message must be the user's"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 2 is assistant"),
])
def test_malformed_dialogs_are_refused(dialog, needle):
    with pytest.raises(UserError, match=needle):
        check_dialog(dialog)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, spm_path):
    folder, _ = make_model_folder(tmp_path_factory.mktemp("chat"), spm_path, TINY)
    return folder, Llama.build(str(folder), str(folder / "tokenizer.model"), 256, 2)


def test_chat_completion_is_generate_on_the_dialog_tokens(chat_llama):
    folder, llama = chat_llama
    out = llama.chat_completion(DIALOGS, temperature=0, max_gen_len=12, logprobs=True)
    assert len(out) == 3
    for d, o in zip(DIALOGS, out):
        assert o["generation"]["role"] == "assistant"
        ids = meta_llama2_tokens(d, llama.tokenizer)
        want = llama.generate([ids], max_gen_len=12, temperature=0)[0][0]
        assert o["generation"]["content"] == llama.tokenizer.decode(want)
        assert len(o["logprobs"]) == len(o["tokens"]) == len(want)
    unsafe = llama.chat_completion([[{"role": "user", "content": "hi [INST] there"}]], temperature=0, max_gen_len=4)
    assert unsafe[0]["generation"]["content"] == "Error: special tags are not allowed as part of the prompt."
    with pytest.raises(UserError, match="dialog 0: the last message must be the user's"):
        llama.chat_completion([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_dialogs_in_prompt_files_both_schedules_output_file_and_resume(chat_llama, tmp_path, capsys):
    folder, llama = chat_llama
    rows = [{"messages": DIALOGS[0], "id": "a"}, {"prompt": "Hello world"}, {"messages": DIALOGS[2], "max_gen_len": 3}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = {}
    for schedule in ("continuous", "static"):
        out = tmp_path / f"{schedule}.jsonl"
        args = ["--ckpt_dir", str(folder), "--prompts_file", str(f), "--output", "jsonl", "--temperature", "0",
                "--max_gen_len", "8", "--schedule", schedule, "--output_file", str(out), "-q"]
        assert cli(args) == 0
        recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert recs[0]["messages"] == DIALOGS[0] and recs[0]["message"]["role"] == "assistant"
        assert recs[0]["message"]["content"] == recs[0]["generation"] and "prompt" not in recs[0]
        want = llama.generate([meta_llama2_tokens(DIALOGS[0], llama.tokenizer)], max_gen_len=8, temperature=0)[0][0]
        assert recs[0]["tokens"] == want
        assert len(recs[2]["tokens"]) <= 3 and recs[1]["prompt"] == "Hello world"
        outs[schedule] = recs
        assert cli(args + ["--resume"]) == 0  # every dialog is already in the file: nothing to redo
        assert capsys.readouterr().out == ""
    assert [r["tokens"] for r in outs["continuous"]] == [r["tokens"] for r in outs["static"]]


def test_bad_dialog_lines_fail_before_the_model_loads(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "fine"}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}) + "\n")
    assert cli(["--ckpt_dir", str(tmp_path / "none"), "--prompts_file", str(f)]) == 2
    err = capsys.readouterr().err
    assert f'{f} line 2: message 2 has role "bot"' in err and len(err.strip().splitlines()) == 1


def test_an_unknown_chat_format_fails_before_the_model_loads(tmp_path, capsys):
    for argv in (["chat"], ["--prompt", "Hi"]):
        assert cli([*argv, "--ckpt_dir", str(tmp_path / "none"), "--chat_format", "llama9"]) == 2
        err = capsys.readouterr().err  # no load was tried: the folder does not exist
        assert err == "llama-cli: error: --chat_format must be auto, llama2, llama3 or template, got 'llama9'\n"


def test_a_template_that_fails_on_a_line_names_it(tmp_path, capsys):
    path = make_hf_tokenizer(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}x"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": DIALOGS[0]}) + "\n" + json.dumps({"messages": DIALOGS[1]}) + "\n")
    assert cli(["--ckpt_dir", str(tmp_path / "m"), "--tokenizer_path", str(path), "--prompts_file", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f} line 2: the chat template cannot render this dialog: one message only" in err


def test_interactive_conversation_keeps_history_resets_and_trims(chat_llama):
    from llama_cli.converse import converse, text_lines
    from llama_cli.settings import Settings

    _, llama = chat_llama
    s = Settings(temperature=0.0, max_gen_len=6)
    out, err = io.StringIO(), io.StringIO()
    # a line typed in a Latin-1 terminal (not UTF-8) is asked for again, and the conversation goes on
    typed = io.BytesIO(b"Hello world\ncaf\xe9\nThe cat\n/reset\nHello world\n")
    converse(llama, s, "Be brief.", text_lines(typed), out, err, True)
    assert "that line is not UTF-8 text (is the terminal set to UTF-8?); type it again" in err.getvalue()
    replies = out.getvalue().split("\n")[:3]
    first = llama.chat_completion([[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello world"}]], temperature=0, max_gen_len=6)
    assert replies[0] == first[0]["generation"]["content"]
    second = llama.chat_completion([[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hello world"},
                                     {"role": "assistant", "content": replies[0]},
                                     {"role": "user", "content": "The cat"}]], temperature=0, max_gen_len=6)
    assert replies[1] == second[0]["generation"]["content"]  # the history was kept
    assert replies[2] == replies[0]  # /reset: the same first message gets the same reply
    assert "conversation reset" in err.getvalue()
    # a long conversation in a small context: the oldest exchanges go, with a note
    out, err = io.StringIO(), io.StringIO()
    words = "the cat runs under the blue tree and the dog sleeps " * 3
    converse(llama, s, None, [words + "\n"] * 8, out, err, True)
    assert "dropped the" in err.getvalue() and out.getvalue().count("\n") == 8


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(chat_llama, monkeypatch):
    """On a terminal, Ctrl-C during a reply stops it where it is (it used to end the chat, its history lost): the
    words shown stay the reply, in the history, and the next message is answered. Piped, Ctrl-C ends the run."""
    from llama_cli.converse import converse
    from llama_cli.settings import Settings

    _, llama = chat_llama
    s = Settings(temperature=0.0, max_gen_len=12)
    plain = llama.generate_settings
    calls = []

    def ctrl_c_at_step_4(prompts, settings, on_step=None, **kw):
        calls.append(prompts[0])
        if len(calls) > 1:
            return plain(prompts, settings, on_step=on_step, **kw)
        steps = []

        def step(tokens):
            steps.append(tokens)
            on_step(tokens)
            if len(steps) == 4:
                raise KeyboardInterrupt

        return plain(prompts, settings, on_step=step, **kw)

    monkeypatch.setattr(llama, "generate_settings", ctrl_c_at_step_4)
    for output in ("text", "jsonl"):
        calls.clear()
        out, err = io.StringIO(), io.StringIO()
        assert converse(llama, s, None, ["Hello world\n", "The cat\n"], out, err, True, output) == 0
        assert "Ctrl-C stops a reply" in err.getvalue() and err.getvalue().count("(reply stopped)") == 1
        if output == "jsonl":
            first, second = [json.loads(line) for line in out.getvalue().splitlines()]
            assert first["finish_reason"] == "interrupted" and len(first["tokens"]) == 4
            stopped = first["generation"]
        else:
            stopped, answer = out.getvalue().split("\n")[:2]
        whole = llama.chat_completion([[{"role": "user", "content": "Hello world"}]], temperature=0,
                                      max_gen_len=12)[0]["generation"]["content"]
        assert stopped and whole.startswith(stopped) and stopped != whole  # the first 4 tokens' words
        # the second message was sent with the stopped reply in the history
        want = llama.encode_dialog([{"role": "user", "content": "Hello world"},
                                    {"role": "assistant", "content": stopped}, {"role": "user", "content": "The cat"}])
        assert calls[1] == want
    monkeypatch.setattr(llama, "generate_settings", ctrl_c_at_step_4)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # piped: a script's Ctrl-C ends the run (exit 130 in cli)
        converse(llama, s, None, ["Hello world\n", "The cat\n"], io.StringIO(), io.StringIO(), False)
    from llama_cli.cli import Terminated

    def terminated(*a, **kw):
        raise Terminated

    monkeypatch.setattr(llama, "generate_settings", terminated)
    with pytest.raises(Terminated):  # `kill` (SIGTERM, a KeyboardInterrupt of ours) ends even a terminal's chat
        converse(llama, s, None, ["Hello world\n"], io.StringIO(), io.StringIO(), True)


def test_piped_chat_answers_each_line_on_its_own(chat_llama):
    folder, llama = chat_llama
    proc = subprocess.run([sys.executable, "-m", "llama_cli", "chat", "--ckpt_dir", str(folder), "--temperature", "0",
                           "--max_gen_len", "6"], input="Hello world\nThe cat\n", capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    for text, got in zip(["Hello world", "The cat"], lines):
        want = llama.chat_completion([[{"role": "user", "content": text}]], temperature=0, max_gen_len=6)
        assert got == want[0]["generation"]["content"]


def test_piped_chat_jsonl_is_one_line_a_reply_as_the_completion_command_writes_dialogs(chat_llama, tmp_path,
                                                                                         monkeypatch, capsys):
    """A reply may span lines, so piped text replies cannot be told apart by a script; --output jsonl writes
    each as one object on one line: the record the completion command writes for the same dialog, or an error
    entry for a message too long for --max_seq_len (which makes the exit code 1 at the end, the replies after it
    still given). Blank lines get no reply and no index."""
    folder, _ = chat_llama
    long = "the cat runs under the blue tree " * 20
    flags = ["--ckpt_dir", str(folder), "--temperature", "0", "--max_gen_len", "6", "--max_seq_len", "64", "--quiet"]

    def chat(output):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"Hello world\n\n{long}\nThe cat\n".encode())))
        assert cli(["chat", *flags, "--output", output]) == 1  # one message did not fit
        out, err = capsys.readouterr()
        assert "this message is" in err and "too long for --max_seq_len 64 with room to reply" in err
        closing = "; see their error entries" if output == "jsonl" else " (an empty reply each)"
        assert err.endswith(f"llama-cli: 1 of 3 message(s) could not run{closing}\n")
        return out

    records = [json.loads(line) for line in chat("jsonl").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[1] == {"index": 1, "messages": [{"role": "user", "content": long}], "error": records[1]["error"]}
    assert records[1]["error"].startswith("this message is ")
    answered = [records[0], records[2]]
    f = tmp_path / "dialogs.jsonl"
    f.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in answered))
    assert cli([*flags, "--prompts_file", str(f), "--output", "jsonl"]) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{**r, "index": 0} for r in answered] == [{**w, "index": 0} for w in want]
    assert [r["message"]["content"] for r in answered] == [r["generation"] for r in answered]
    # text: the same replies, and an empty line for the message that did not fit
    assert chat("text") == answered[0]["generation"] + "\n\n" + answered[1]["generation"] + "\n"


def test_interactive_chat_jsonl_keeps_the_conversation(chat_llama):
    """On a terminal, --output jsonl prints each reply as its record (the dialog as it was sent, history
    included) instead of streaming it; the conversation goes on as in text."""
    from llama_cli.converse import converse
    from llama_cli.settings import Settings

    _, llama = chat_llama
    s = Settings(temperature=0.0, max_gen_len=6)
    out, err = io.StringIO(), io.StringIO()
    assert converse(llama, s, "Be brief.", ["Hello world\n", "The cat\n"], out, err, True, "jsonl") == 0
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    text = io.StringIO()
    converse(llama, s, "Be brief.", ["Hello world\n", "The cat\n"], text, io.StringIO(), True)
    assert text.getvalue() == first["generation"] + "\n" + second["generation"] + "\n"
    assert second["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hello world"},
                                  {"role": "assistant", "content": first["generation"]},
                                  {"role": "user", "content": "The cat"}]
    assert (first["index"], second["index"]) == (0, 1) and first["finish_reason"] in ("stop", "length")


def test_chat_under_torchrun_reads_on_rank_0_and_answers_as_one_process(tmp_path, spm_path):
    """Found by hand: under torchrun every rank read the same standard input, each taking some of its lines,
    and the ranks' collectives parted (gloo: "Connection closed by peer"). Rank 0 now reads and hands each line
    to the others; the replies (sampled, default temperature) are one process's, printed once."""
    folder, _ = make_model_folder(tmp_path / "two", spm_path, TINY, n_shards=2)
    args = ["-m", "llama_cli", "chat", "--ckpt_dir", str(folder), "--max_gen_len", "6", "--max_seq_len", "64",
            "--output", "jsonl", "--seed", "3"]
    typed = "Hello world\n\nThe cat\nthe dog runs\n"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args], input=typed, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args], input=typed, env=subprocess_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout == one.stdout and len(one.stdout.splitlines()) == 3
    assert two.stderr.count("llama-cli: loaded") == 1  # rank 0 alone tells
    # standard output closed by its reader (`| head -1`): every rank's chat ends at the next message, exit 0 (rank
    # 0 alone used to stop, the others failing at their next collective without it)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llama_cli", "chat", "--ckpt_dir", str(folder), "--max_gen_len", "40",
                          "--max_seq_len", "128", "--temperature", "0", "--output", "jsonl"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=subprocess_env(), cwd=REPO)
    p.stdin.write("".join(f"Message number {i} says hello\n" for i in range(40)))
    p.stdin.close()
    assert json.loads(p.stdout.readline())["index"] == 0
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0, err[-3000:]
    assert "Connection closed" not in err and "error" not in err.lower()


def test_chat_quantized_at_load_answers_as_the_quantized_copy(chat_llama, tmp_path, monkeypatch, capsys):
    """chat takes --quantize (and --group_size, --compile, --cuda_graphs) as the completion command does: the
    replies are those of the checkpoint `llama-cli quantize` writes; --group_size alone is refused before loading."""
    folder, _ = chat_llama
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "q"), "--mode", "int4",
                "--group_size", "32"]) == 0
    flags = ["--temperature", "0", "--max_gen_len", "6", "--max_seq_len", "64", "--output", "jsonl", "--quiet",
             "--tokenizer_path", str(folder / "tokenizer.model"), "--compile", "off"]
    got = []
    for ckpt, more in ((folder, ["--quantize", "int4", "--group_size", "32"]), (tmp_path / "q", [])):
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello world\nThe cat\n")))
        assert cli(["chat", "--ckpt_dir", str(ckpt), *flags, *more]) == 0
        got.append([json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()])
    assert got[0] == got[1] and len(got[0]) == 2
    assert cli(["chat", "--ckpt_dir", str(tmp_path / "none"), "--group_size", "32"]) == 2
    assert capsys.readouterr().err == "llama-cli: error: --group_size goes with --quantize int8 or int4\n"


def test_shared_lines_reach_every_rank_with_heartbeats_while_rank_0_waits(tmp_path):
    """Rank 0 may wait minutes for a person to type; the other ranks wait in a collective meanwhile, which
    times out (NCCL after 10 minutes) unless rank 0 tells them it is still waiting. Here a heartbeat every
    0.05 s while lines come every 0.3 s: every rank gets rank 0's lines (a line that is not UTF-8 too, for
    converse to refuse), none reads its own, and all take part in the same broadcasts."""
    out = tmp_path / "lines"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "lines_worker.py"), str(out)], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"lines.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["lines"] == ["hello\n", "caf\udce9 (not UTF-8)\n", "\n", "/exit\n"]
    assert ranks[0]["heartbeats"] >= 8 and ranks[0]["broadcasts"] == ranks[0]["heartbeats"] + 5


def test_piped_chat_that_is_not_utf8_stops_at_that_line(chat_llama):
    """Found by hand after scripts/fuzz_cli.py: a Latin-1 line reached the tokenizer as text it cannot take
    (exit 1 with pybind11's message); now the line is named, exit 2, and the replies before it stand."""
    folder, llama = chat_llama
    proc = subprocess.run([sys.executable, "-m", "llama_cli", "chat", "--ckpt_dir", str(folder), "--temperature", "0",
                           "--max_gen_len", "4", "--quiet"], input=b"Hello world\ncaf\xe9\n", capture_output=True,
                          env={**subprocess_env(), "LC_ALL": "C"}, cwd=REPO, timeout=300)
    want = llama.chat_completion([[{"role": "user", "content": "Hello world"}]], temperature=0, max_gen_len=4)
    assert proc.returncode == 2
    assert proc.stdout.decode().split("\n")[0] == want[0]["generation"]["content"]
    assert proc.stderr.decode().strip() == "llama-cli: error: standard input line 2 is not UTF-8 text; send UTF-8"


@pytest.mark.parametrize("flag", ["-p", "--prompt", "-f", "--prompts_file"])
def test_chat_says_where_its_messages_come_from(tmp_path, capsys, flag):
    """A prompt flag given to chat (llama.cpp's -p, ours from completion) is answered with how chat takes its
    messages, in one line, before anything loads."""
    assert cli(["chat", "--ckpt_dir", str(tmp_path / "none"), flag, "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llama-cli: error: unknown flag {flag}; chat takes your messages typed at its prompt or one a "
                   "line on standard input: echo TEXT | llama-cli chat --ckpt_dir DIR")


def test_chat_says_its_replies_stream_without_a_flag(tmp_path, capsys):
    """--stream (the completion command's) given to chat: its text replies always stream; said so, not "did you
    mean --system?". --output_file: standard output is where they go; --ctx: --max_seq_len."""
    assert cli(["chat", "--ckpt_dir", str(tmp_path / "none"), "--stream"]) == 2
    assert capsys.readouterr().err.strip() == ("llama-cli: error: unknown flag --stream; chat's text replies stream "
                                               "as they are generated; there is nothing to turn on")
    assert cli(["chat", "--ckpt_dir", str(tmp_path / "none"), "--output_file", "f.txt"]) == 2
    assert "chat writes its replies to standard output; redirect it" in capsys.readouterr().err
    assert cli(["chat", "--ckpt_dir", str(tmp_path / "none"), "--ctx", "100"]) == 2  # llama.cpp's name
    assert "unknown flag --ctx; did you mean --max_seq_len?" in capsys.readouterr().err


def test_dash_q_is_quiet_in_chat_too(chat_llama, monkeypatch, capsys):
    """-q is --quiet in every command (README); in chat, whose only flag beginning with q is --quantize, fire's help
    offered -q for --quantize and the command refused -q as an unknown flag."""
    folder, _ = chat_llama
    assert cli(["chat", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--quantize" in text and "-q, --quantize" not in text
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello world\n")))
    assert cli(["chat", "--ckpt_dir", str(folder), "--temperature", "0", "--max_gen_len", "4", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and err == ""
