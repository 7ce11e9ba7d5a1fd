"""Tokenizers behind one small interface, picked by sniffing the file's bytes, never its name.

Every tokenizer offers `encode(text, *, bos, eos)`, `decode(ids)`, `bos_id`, `eos_id`,
`pad_id`, `stop_ids` (ids that end a generation), `n_words` and `add_bos` (whether a
prompt starts with the BOS token, from the tokenizer's own settings).

- SentencePiece `tokenizer.model` (Llama 1/2, and rebuilt from GGUF "llama" vocabularies; BOS is
  prepended unless a `tokenizer_config.json` beside it says `"add_bos_token": false`);
- tiktoken BPE `tokenizer.model` (Llama 3: base64 token + rank per line, plus 256 special tokens);
- HuggingFace `tokenizer.json` (through the `tokenizers` library), with BOS/EOS and
  `add_bos_token` from `tokenizer_config.json` and extra stop ids from `generation_config.json`
  beside it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Protocol, Sequence

from .errors import UserError
from .settings import check_path

# The files that make up a tokenizer in a model folder (copied along by reshard and convert).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")

ACCEPTED = ("a SentencePiece tokenizer.model (Llama 1/2), a tiktoken tokenizer.model (Llama 3) "
            "or a HuggingFace tokenizer.json")


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    n_words: int
    stop_ids: frozenset
    add_bos: bool

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is not a readable tokenizer ({_first_line(e)}); expected {ACCEPTED}") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        if self.eos_id < 0:
            raise UserError(f"{path} defines no end-of-sequence token; a LLaMA tokenizer needs one")
        self.stop_ids = frozenset({self.eos_id})
        # Meta's models always start with BOS; a converted model may say otherwise beside the file
        config = _read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json"))
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id >= 0

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = 256


def llama3_special_tokens(n: int = LLAMA3_SPECIALS) -> list[str]:
    """Meta's Llama 3 special tokens, in id order after the BPE ranks."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    return names + [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]


class TiktokenTokenizer:
    """Llama 3's tokenizer.model: tiktoken BPE ranks plus Meta's special tokens."""

    add_bos = True

    def __init__(self, path: str):
        import tiktoken

        ranks = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise UserError(f"{path} line {lineno} is not 'base64-token rank'; expected {ACCEPTED}") from None
        specials = {name: len(ranks) + i for i, name in enumerate(llama3_special_tokens())}
        self.model = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=specials)
        self.n_words = self.model.n_vocab
        self.specials = specials
        self.bos_id, self.eos_id, self.pad_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"], -1
        self.stop_ids = frozenset({self.eos_id, specials["<|eot_id|>"]})

    def special_id(self, name: str) -> int:
        return self.specials[name]

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = []
        for i in range(0, len(text), 400_000):  # tiktoken slows down on very long pieces
            ids += self.model.encode(text[i:i + 400_000], allowed_special="all", disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


class HFTokenizer:
    """A HuggingFace tokenizer.json, with its settings from tokenizer_config.json beside it."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTok

        try:
            self.tk = HFTok.from_file(path)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UserError(f"{path} is not a readable tokenizer.json ({_first_line(e)}); "
                            f"expected {ACCEPTED}") from None
        folder = os.path.dirname(os.path.abspath(path))
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.n_words = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(config.get("bos_token"))
        self.eos_id = self._token_id(config.get("eos_token"))
        if self.eos_id < 0:
            raise UserError(f"{path}: no eos_token in tokenizer_config.json beside it; generation needs to know "
                            "where a text ends")
        self.pad_id = -1
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id >= 0
        stops = {self.eos_id}
        gen = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and 0 <= i < self.n_words:
                stops.add(i)
        self.stop_ids = frozenset(stops)

    def special_id(self, name: str) -> int:
        i = self.tk.token_to_id(name)
        if i is None:
            raise UserError(f"the tokenizer has no token {name}")
        return i

    def _token_id(self, token) -> int:
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return -1
        i = self.tk.token_to_id(token)
        return -1 if i is None else i

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def find_tokenizer(ckpt_dir: str) -> str:
    """The default tokenizer for a checkpoint folder: its tokenizer.json or tokenizer.model, else
    a tokenizer.model in the parent folder (Meta's Llama 2 download layout)."""
    for folder in (ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir))):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return os.path.join(ckpt_dir, "tokenizer.model")


def load_tokenizer(path: str) -> Tokenizer:
    """Open a tokenizer file, choosing the format from its contents, never its name. A folder
    is searched for tokenizer.json, then tokenizer.model."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model")
                 if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise UserError(f"tokenizer path {path} is a folder without tokenizer.json or tokenizer.model; "
                            f"give the tokenizer file ({ACCEPTED})")
        path = found[0]
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path} does not exist; pass --tokenizer_path with {ACCEPTED}")
    check_path(path, "tokenizer file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise UserError(f"tokenizer file {path} is empty; expected {ACCEPTED}")
    if head.lstrip()[:1] == b"{":
        return HFTokenizer(path)
    if re.match(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n", head):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
