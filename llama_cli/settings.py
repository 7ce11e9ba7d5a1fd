"""Per-prompt generation settings, resolved and checked in one place.

A prompt's effective settings are the flags' values (or the Python API's arguments) with the
prompt's own overrides on top (JSONL keys of the same names). `resolve` makes that one checked
record before any model is loaded; both schedules and `Llama.generate` read only the record.
A bad value raises UserError naming where it came from (a flag, or a file and line), the key
and the accepted range.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Optional

from .errors import UserError

SEED_MAX = 2**64 - 1  # the largest seed torch's generators take
KV_CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # --kv_cache_dtype: auto is the activations' type


@dataclass(frozen=True)
class Settings:
    max_gen_len: int = 64
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple = ()  # texts that end the generation (not part of the output)
    seed: Optional[int] = None  # this prompt's own draws (sampling.stream_key); None: the run's --seed and its index

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        return cls(**{k: tuple(v) if k == "stop" else v for k, v in d.items()})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    if hi == math.inf:
        text = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, text


def _integer(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= lo), f"an integer >= {lo}"


def check_text(text: str, where: str) -> str:
    """text, if it can be written as UTF-8; else a UserError naming `where`. Python strings can hold halves of
    UTF-16 surrogate pairs that no text has: a command-line argument's bytes that are not UTF-8 arrive so, as
    does a lone \\uD800-\\uDFFF escape in JSON; the tokenizers and the output files cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid text: character {e.start + 1} is {ascii(text[e.start])[1:-1]}, half of "
                        "a UTF-16 surrogate pair (bytes that are not UTF-8, or a lone \\u escape in JSON); "
                        "give UTF-8 text") from None
    return text


def check_path(path: str, what: str) -> str:
    """path, if its name is UTF-8; else a UserError naming `what`. A file name's bytes that are not UTF-8 reach
    Python as halves of surrogate pairs (as in check_text): Python's own files open them, but PyTorch, the
    tokenizer libraries and safetensors take UTF-8 names only, and fail with a message about their arguments."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = repr(path.encode("utf-8", "surrogateescape"))[2:-1]
        raise UserError(f"{what} {shown} has a name that is not UTF-8 (character {e.start + 1}); PyTorch and the "
                        "tokenizer libraries open UTF-8 names only: rename it, or reach it through a link with a "
                        "UTF-8 name (ln -s)") from None
    return path


def _stops(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(s, str) and s != "" for s in v)


# key -> (check, the accepted values in words, what it does)
SPEC: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_gen_len": _integer(1),
    "temperature": _number(0, math.inf, False, False),
    "top_p": _number(0, 1, True, False),
    "top_k": _integer(0),
    "min_p": _number(0, 1, False, True),
    "repetition_penalty": _number(0, math.inf, True, False),
    "presence_penalty": _number(-2, 2, False, False),
    "frequency_penalty": _number(-2, 2, False, False),
    "stop": (_stops, "a list of non-empty texts"),
    "seed": ((lambda v: not isinstance(v, bool) and isinstance(v, int) and 0 <= v <= SEED_MAX),
             "an integer from 0 to 2**64 - 1"),
}
KEYS = tuple(f.name for f in fields(Settings))
# accepted values past which nothing changes, brought to these bounds: no prompt or vocabulary is 2**31 tokens long,
# a positive temperature under 1e-6 samples as greedy as 1e-6, past 1e20 as evenly; a repetition penalty past 1e20
# (or under 1e-20) zeroes (or sends to the top) the seen tokens' logits as surely, and keeps them finite in fp32
LIMITS = {"max_gen_len": (1, 2**31 - 1), "top_k": (0, 2**31 - 1), "temperature": (1e-6, 1e20),
          "repetition_penalty": (1e-20, 1e20)}


def check(key: str, value, where: str):
    """value, checked (and normalised: a single stop text becomes a one-item tuple); `where` names
    its origin: "--top_p", or 'prompts.jsonl line 3: "top_p"'."""
    if key == "stop" and isinstance(value, str):
        value = [value]
    ok, accepted = SPEC[key]
    if not ok(value):
        shown = json.dumps(value) if not isinstance(value, tuple) else json.dumps(list(value))
        raise UserError(f"{where} must be {accepted}, got {shown}")
    if key == "stop":
        return tuple(check_text(t, where) for t in value)
    if key in LIMITS:  # beyond these a value means what the limit means, and the sampler's tensors can hold it
        lo, hi = LIMITS[key]
        value = value if key == "temperature" and value == 0 else min(max(value, lo), hi)
    if key in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        return float(value)
    return value


def resolve(base: Settings, overrides: dict, where: str = "") -> Settings:
    """`base` with `overrides` (key -> value, None meaning "not given") on top, every value checked.
    Error messages read '{where}: "key" must be ...' (or '--key must be ...' when where is empty)."""
    changes = {}
    for key, value in overrides.items():
        if key not in SPEC:
            raise UserError(f"{where}: unknown setting {json.dumps(key)}; the settings are {', '.join(KEYS)}")
        if value is None:
            continue
        changes[key] = check(key, value, f'{where}: "{key}"' if where else f"--{key}")
    return replace(base, **changes)
