"""Per-prompt settings: flags + each prompt's overrides, resolved and checked once, before any model loads."""

import json

import pytest

from helpers import TINY, make_model_folder
from llama_cli.cli import cli
from llama_cli.errors import UserError
from llama_cli.prompts import read_prompts
from llama_cli.settings import Settings, resolve

BAD = [  # (key, value, the accepted range in the message)
    ("temperature", -1, "a number >= 0"),
    ("top_p", 5, "a number in (0, 1]"),
    ("top_p", 0, "a number in (0, 1]"),
    ("max_gen_len", -5, "an integer >= 1"),
    ("max_gen_len", 0, "an integer >= 1"),
    ("max_gen_len", 2.5, "an integer >= 1"),
    ("top_k", -1, "an integer >= 0"),
    ("min_p", 1, "a number in [0, 1)"),
    ("repetition_penalty", 0, "a number > 0"),
    ("presence_penalty", 3, "a number in [-2, 2]"),
    ("frequency_penalty", "high", "a number in [-2, 2]"),
    ("stop", [""], "a list of non-empty texts"),
    ("stop", 7, "a list of non-empty texts"),
    ("temperature", True, "a number >= 0"),
]


@pytest.mark.parametrize("key,value,accepted", BAD)
@pytest.mark.parametrize("schedule", ["continuous", "static"])
def test_bad_prompt_file_value_fails_before_the_model_loads(capsys, tmp_path, key, value, accepted, schedule):
    """The checkpoint folder here does not exist: the prompt file's error must come first, whichever schedule."""
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + json.dumps({"prompt": "bad", key: value}) + "\n")
    code = cli(["--ckpt_dir", str(tmp_path / "no-model"), "--prompts_file", str(f), "--schedule", schedule])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert f'{f} line 3: "{key}" must be {accepted}, got {json.dumps(value)}' in lines[0], lines[0]


def test_flags_are_checked_the_same_way(capsys, tmp_path):
    code = cli(["--ckpt_dir", str(tmp_path), "--prompt", "x", "--min_p", "1.5"])
    assert code == 2 and "--min_p must be a number in [0, 1), got 1.5" in capsys.readouterr().err
    code = cli(["--ckpt_dir", str(tmp_path), "--prompt", "x", "--stop", ""])
    assert code == 2 and "--stop must be a list of non-empty texts" in capsys.readouterr().err


def test_overrides_apply_on_top_of_the_flags(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "temperature": 0, "stop": "END", "max_gen_len": 1}) + "\n"
                 + json.dumps({"prompt": "b", "top_k": 5, "extra": "metadata is fine"}) + "\n")
    base = Settings(max_gen_len=32, temperature=0.7, top_p=0.8)
    a, b = read_prompts(None, str(f), defaults=base)
    assert a.settings == Settings(max_gen_len=1, temperature=0.0, top_p=0.8, stop=("END",))
    assert b.settings == Settings(max_gen_len=32, temperature=0.7, top_p=0.8, top_k=5)


def test_keys_that_are_not_settings_are_named_once(tmp_path, monkeypatch, caplog):
    """Extra keys are kept as metadata, but each is named once on stderr (with the setting it may be a typo of),
    in prompt and dialog lines alike: a misspelt "tempreature" does not pass unnoticed."""
    import logging

    import llama_cli.prompts as prompts

    monkeypatch.setattr(prompts, "_warned", set())
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "tempreature": 0, "source": "x"}) + "\n"
                 + json.dumps({"prompt": "b", "tempreature": 0}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "c"}], "max_gen_lenght": 4}) + "\n")
    with caplog.at_level(logging.WARNING, logger="llama_cli"):
        a, b, c = read_prompts(None, str(f), defaults=Settings(temperature=0.7))
    assert a.settings.temperature == 0.7  # ignored, not guessed
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f'{f} line 1: ignoring key(s) "source", "tempreature" (did you mean "temperature"?) '
                               '(the settings a prompt may carry: max_gen_len, temperature, '), lines
    assert 'line 3: ignoring key(s) "max_gen_lenght" (did you mean "max_gen_len"?)' in lines[1], lines


def test_a_pipe_as_prompts_file(tmp_path):
    """--prompts_file <(command) in a shell is a pipe (/dev/fd/N): read as standard input is (JSONL where its
    first line is a prompt object, else one prompt a line); it used to be refused as not existing."""
    import os
    import threading

    for text, want in [('{"prompt": "a", "max_gen_len": 3}\n{"prompt": "b"}\n', [("a", 3), ("b", 32)]),
                       ("first line\nsecond line\n", [("first line", 32), ("second line", 32)])]:
        fifo = tmp_path / f"pipe{len(want)}{len(text)}"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
        writer.start()
        got = read_prompts(None, str(fifo), defaults=Settings(max_gen_len=32))
        writer.join()
        assert [(r.prompt, r.settings.max_gen_len) for r in got] == want


def test_standard_input_holding_a_json_array():
    """Standard input (or a pipe) that is one JSON array is read as a .json file is; lines that merely start
    with "[" (Llama 2's "[INST] ..." chat prompts) stay one prompt a line (the array used to become prompts
    "[", '"first",' ...)."""
    import io

    array = b'[\n  "first",\n  {"prompt": "second", "max_gen_len": 3}\n]\n'
    got = read_prompts(None, None, stdin=io.BytesIO(array), defaults=Settings(max_gen_len=32))
    assert [(r.prompt, r.settings.max_gen_len) for r in got] == [("first", 32), ("second", 3)]
    lines = b"[INST] one [/INST]\n[INST] two [/INST]\n"
    got = read_prompts(None, None, stdin=io.BytesIO(lines), defaults=Settings())
    assert [r.prompt for r in got] == ["[INST] one [/INST]", "[INST] two [/INST]"]


def test_resolve_normalises_and_names_the_origin():
    s = resolve(Settings(), {"temperature": 1, "stop": "x", "top_k": None}, "here")
    assert s.temperature == 1.0 and isinstance(s.temperature, float) and s.stop == ("x",) and s.top_k == 0
    with pytest.raises(UserError, match='here: unknown setting "temp"'):
        resolve(Settings(), {"temp": 1}, "here")
    with pytest.raises(UserError, match=r"^--top_p must be"):
        resolve(Settings(), {"top_p": 2})


def test_values_past_what_changes_anything_are_brought_within_the_samplers_reach(tmp_path, spm_path, capsys):
    """Found by scripts/fuzz_cli.py: --top_k 2**64 or a static --max_gen_len of 10**26 overflowed a tensor,
    --temperature 1e308 or --repetition_penalty 1e308 overflowed fp32, and 1e-320 (0 in fp32) divided by zero.
    Such values are accepted and mean what the bound means."""
    huge = {"top_k": 2**64, "max_gen_len": 10**26, "temperature": 1e308, "repetition_penalty": 1e308}
    s = resolve(Settings(), huge)
    assert (s.top_k, s.max_gen_len, s.temperature, s.repetition_penalty) == (2**31 - 1, 2**31 - 1, 1e20, 1e20)
    s = resolve(Settings(), {"temperature": 1e-320, "repetition_penalty": 1e-320})
    assert (s.temperature, s.repetition_penalty) == (1e-6, 1e-20)
    assert resolve(Settings(), {"temperature": 0}).temperature == 0  # greedy stays greedy
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    for extra in (["--top_k", str(2**64), "--schedule", "static", "--max_gen_len", str(10**26)],
                  ["--temperature", "1e308", "--repetition_penalty", "1e-320"],
                  ["--temperature", "1e-320", "--repetition_penalty", "1e308", "--top_k", str(2**64)]):
        code = cli(["--ckpt_dir", str(folder), "--prompt", "Hi", "--prompt", "the cat", "--max_seq_len", "24",
                    "--output", "jsonl", "--quiet", "--seed", "3", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [len(json.loads(line)["tokens"]) > 0 for line in out.splitlines()] == [True, True]


def test_python_api_uses_the_same_checks(tmp_path, spm_path):
    from llama_cli import Llama

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 32, 1)
    with pytest.raises(UserError, match=r'generate\(\): "max_gen_len" must be an integer >= 1, got 0'):
        llama.generate([[1, 5]], max_gen_len=0)
    with pytest.raises(UserError, match=r'"top_p" must be a number in \(0, 1\]'):
        llama.text_completion(["hi"], top_p=3)
    with pytest.raises(UserError, match=r"prompt 1 is not valid text: character 2 is \\ud800"):
        llama.text_completion(["hi", "a\ud800"])
    with pytest.raises(UserError, match=r"message 1 is not valid text"):
        llama.chat_completion([[{"role": "user", "content": "\udc80"}]])
    with pytest.raises(UserError, match=r'"stop" is not valid text'):
        resolve(Settings(), {"stop": ["\udc80"]}, "generate()")


def test_python_api_refuses_what_is_not_token_ids(tmp_path, spm_path):
    """Found by hand: ids outside the vocabulary failed inside the embedding (IndexError), a text in place of
    token lists with a TypeError, floats were truncated; a prompt past the first batch was named by its place in
    that batch. numpy's and torch's integers are token ids too."""
    import numpy as np
    import torch

    from llama_cli import Llama

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 32, 2)
    vocab = llama.model.params.vocab_size
    for prompts, message in (([[1, vocab]], f"prompt 0 has token id {vocab}, outside this model's vocabulary "
                                             f"\\(0 to {vocab - 1}\\)"),
                             ([[1, 2], [3], [5, -1]], "prompt 2 has token id -1"),
                             ("hello", "prompt 0 is not a list of token ids"), ([[1, 2.5]], "prompt 0 is not a list"),
                             ([[1], [1, True]], "prompt 1 is not a list"), ([[1], [2], []], "prompt 2 is empty"),
                             ([[1], [2], [1] * 40], "prompt 2 has 40 tokens but max_seq_len is 32")):
        with pytest.raises(UserError, match=message):
            llama.generate(prompts, max_gen_len=2, temperature=0)
    with pytest.raises(UserError, match="text_completion takes a list of prompts, not one text"):
        llama.text_completion("hello", max_gen_len=2)  # it completed each letter
    with pytest.raises(UserError, match="chat_completion takes a list of dialogs"):
        llama.chat_completion([{"role": "user", "content": "hi"}], max_gen_len=2)
    want = llama.generate([[1, 5, 7]], max_gen_len=3, temperature=0)[0]
    assert llama.generate([np.array([1, 5, 7])], max_gen_len=3, temperature=0)[0] == want
    assert llama.generate([torch.tensor([1, 5, 7])], max_gen_len=3, temperature=0)[0] == want


def test_settings_travel_to_other_ranks_as_json():
    from llama_cli.prompts import PromptRequest

    r = PromptRequest(3, "p", Settings(temperature=0.0, stop=("a", "b"), min_p=0.1), id="x")
    assert PromptRequest.from_json(json.loads(json.dumps(r.to_json()))) == r
