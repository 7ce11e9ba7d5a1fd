"""Tokenizers behind one small interface, picked by sniffing the file's bytes.

Every tokenizer offers `encode(text, *, bos, eos)`, `decode(ids)`, `bos_id`, `eos_id`,
`pad_id`, `stop_ids` (ids that end a generation) and `n_words`.
"""

from __future__ import annotations

import os
import re
from typing import Protocol, Sequence

from .errors import UserError

ACCEPTED = "a SentencePiece tokenizer.model (Llama 1/2)"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    n_words: int
    stop_ids: frozenset

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


def load_tokenizer(path: str) -> Tokenizer:
    """Open a tokenizer file, choosing the format from its contents, never its name."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"tokenizer path {path} is a folder; give the tokenizer file itself ({ACCEPTED})")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path} does not exist; pass --tokenizer_path with {ACCEPTED}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise UserError(f"tokenizer file {path} is empty; expected {ACCEPTED}")
    if head.lstrip()[:1] == b"{":
        raise UserError(f"{path} looks like a HuggingFace tokenizer.json, which this version cannot read; expected {ACCEPTED}")
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        raise UserError(f"{path} looks like a tiktoken BPE file (Llama 3), which this version cannot read; expected {ACCEPTED}")
    return SentencePieceTokenizer(path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
