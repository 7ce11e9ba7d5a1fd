"""Tokenizers: SentencePiece, tiktoken (Llama 3) and HF tokenizer.json, told apart by content."""

import base64
import json

import pytest

from llama_cli.errors import UserError
from llama_cli.tokenizer import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, llama3_special_tokens,
                                 load_tokenizer)


def write_tiktoken(path):
    """A tiny tiktoken BPE file: the 256 bytes, then merges that build a few words."""
    tokens = [bytes([i]) for i in range(256)]
    for merged in (b"he", b"ll", b"llo", b"hello", b" w", b"or", b"orl", b"orld", b" world", b"th", b"the", b" the"):
        tokens.append(merged)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path, len(tokens)


def test_tiktoken_round_trip_with_special_tokens(tmp_path):
    path, n_ranks = write_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.n_words == n_ranks + 256
    specials = llama3_special_tokens()
    assert tok.bos_id == n_ranks + specials.index("<|begin_of_text|>")
    assert tok.stop_ids == {n_ranks + specials.index("<|end_of_text|>"), n_ranks + specials.index("<|eot_id|>")}
    text = "hello world, the café\n<|start_header_id|>user<|end_header_id|> hello<|eot_id|>"
    ids = tok.encode(text, bos=True, eos=False)
    assert ids[0] == tok.bos_id
    assert n_ranks + specials.index("<|eot_id|>") == ids[-1]
    assert 259 in ids  # "hello" (rank 259) is one merged token
    assert tok.decode(ids[1:]) == text
    assert tok.encode("hello", bos=False, eos=True) == [259, n_ranks + specials.index("<|end_of_text|>")]


def test_formats_are_told_apart_by_content_not_name(tmp_path, spm_path):
    tik, _ = write_tiktoken(tmp_path / "looks-like-sentencepiece.model")
    sp = tmp_path / "tiktoken.model"
    sp.write_bytes(spm_path.read_bytes())
    assert isinstance(load_tokenizer(tik), TiktokenTokenizer)
    assert isinstance(load_tokenizer(sp), SentencePieceTokenizer)
    assert load_tokenizer(sp).encode("Hello world", bos=False, eos=False) == \
        load_tokenizer(spm_path).encode("Hello world", bos=False, eos=False)


def test_bad_tiktoken_line_names_it(tmp_path):
    p = tmp_path / "t.model"
    p.write_text("aGVsbG8= 0\naGk= one\n")
    with pytest.raises(UserError, match="line 2"):
        load_tokenizer(p)


def make_hf_tokenizer(folder, add_bos=False, eos="<|im_end|>", extra_stop=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from helpers import corpus

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": eos}, "add_bos_token": add_bos}))
    if extra_stop is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": extra_stop}))
    return folder / "tokenizer.json"


def test_hf_tokenizer_json(tmp_path):
    make_hf_tokenizer(tmp_path / "hf", add_bos=False, extra_stop=[0, 2])
    tok = load_tokenizer(tmp_path / "hf")  # a folder finds its tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.add_bos is False and tok.bos_id == 1 and tok.eos_id == 2 and tok.stop_ids == {0, 2}
    text = "Hello world, café naïve! <|im_start|>user 42"
    ids = tok.encode(text, bos=tok.add_bos, eos=False)
    assert 1 in ids  # the special token in the text is one id
    assert tok.decode(ids) == text
    assert tok.encode("x", bos=True, eos=True)[0] == 1 and tok.encode("x", bos=True, eos=True)[-1] == 2
    path2 = make_hf_tokenizer(tmp_path / "hf2", add_bos=True)
    tok2 = load_tokenizer(path2)
    assert tok2.add_bos is True and tok2.stop_ids == {2}
    assert tok2.encode("x", bos=tok2.add_bos, eos=False)[0] == 1  # now prompts start with BOS


def test_hf_tokenizer_without_eos_is_refused(tmp_path):
    make_hf_tokenizer(tmp_path / "h", eos="<not-in-vocab>")
    with pytest.raises(UserError, match="eos_token"):
        load_tokenizer(tmp_path / "h" / "tokenizer.json")


def test_meta_llama2_tokenizer_golden(llama2_tokenizer):
    tok = load_tokenizer(llama2_tokenizer)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.n_words == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]
    assert tok.decode([15043, 3186]) == "Hello world"
