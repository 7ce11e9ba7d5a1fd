"""Prompts in (flags, .txt/.jsonl files, stdin) and results out (stdout and --output_file).

A prompt file is read and checked whole before any model is loaded, so a bad line is
reported at once with its line number. Results go to --output_file as soon as each is
finished (appended and flushed), and to stdout in input order. With --resume, prompts
whose results are already in the output file are skipped; a line cut short by a killed
run is dropped and redone.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Iterable, Optional

from .errors import UserError

OVERRIDES = {"max_gen_len": (int,), "temperature": (int, float), "top_p": (int, float)}


@dataclass
class PromptRequest:
    index: int  # position in the input, 0-based
    prompt: str
    id: Any = None
    max_gen_len: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Result:
    request: PromptRequest
    generation: str = ""
    tokens: list = field(default_factory=list)
    logprobs: Optional[list] = None
    error: Optional[str] = None

    def record(self) -> dict:
        out = {}
        if self.request.id is not None:
            out["id"] = self.request.id
        out["index"] = self.request.index
        out["prompt"] = self.request.prompt
        if self.error is not None:
            out["error"] = self.error
            return out
        out["generation"] = self.generation
        out["tokens"] = self.tokens
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


def read_prompts(prompts: Optional[list], prompts_file: Optional[str], stdin: IO = None) -> list[PromptRequest]:
    """Prompts from --prompt, else --prompts_file, else a piped stdin (one prompt per line)."""
    if prompts and prompts_file:
        raise UserError("give prompts with --prompt or --prompts_file, not both")
    if prompts:
        for i, p in enumerate(prompts):
            if p.strip() == "":
                raise UserError(f"prompt {i + 1} is empty; give some text to complete")
        return [PromptRequest(i, p) for i, p in enumerate(prompts)]
    if prompts_file:
        if prompts_file == "-":
            return _read_lines(_stdin_lines(stdin), "<stdin>", jsonl=False)
        if os.path.isdir(prompts_file):
            raise UserError(f"--prompts_file {prompts_file} is a folder; give a .txt or .jsonl file")
        if not os.path.isfile(prompts_file):
            raise UserError(f"prompts file {prompts_file} does not exist")
        with open(prompts_file, "rb") as f:
            return _read_lines(f, prompts_file, jsonl=prompts_file.lower().endswith(".jsonl"))
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None or stdin.isatty():
        raise UserError("no prompt given; pass --prompt TEXT, --prompts_file FILE (.txt or .jsonl), "
                        "or pipe prompts on standard input")
    return _read_lines(_stdin_lines(stdin), "<stdin>", jsonl=False)


def _stdin_lines(stdin) -> Iterable[bytes]:
    stdin = stdin if stdin is not None else sys.stdin
    return getattr(stdin, "buffer", stdin)


def _read_lines(lines: Iterable, name: str, jsonl: bool) -> list[PromptRequest]:
    out = []
    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{name} line {lineno} is not UTF-8 text; save the file as UTF-8") from None
        else:
            line = raw
        line = line.rstrip("\r\n")
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        out.append(_parse_jsonl(line, name, lineno, len(out)) if jsonl else PromptRequest(len(out), line))
    if not out:
        raise UserError(f"{name} holds no prompts")
    return out


def _parse_jsonl(line: str, name: str, lineno: int, index: int) -> PromptRequest:
    where = f"{name} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); "
                        'each line must be an object like {"prompt": "..."}') from None
    if not isinstance(obj, dict):
        raise UserError(f'{where} must be a JSON object like {{"prompt": "..."}}, not {type(obj).__name__}')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f'{where} has no "prompt" text' + ("" if prompt is None else f" (got {json.dumps(prompt)})"))
    if not prompt.strip():
        raise UserError(f"{where} has an empty prompt; give some text to complete")
    req = PromptRequest(index, prompt, id=obj.get("id"))
    for key, types in OVERRIDES.items():
        if key in obj and obj[key] is not None:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise UserError(f'{where}: "{key}" must be a number, got {json.dumps(value)}')
            setattr(req, key, value)
    return req


def scan_output(path: str, requests: list[PromptRequest]) -> set[int]:
    """Indices already answered in a JSONL output file. Error entries (a prompt that could not
    run, e.g. too long for --max_seq_len) and a last line cut short by a killed run are removed
    from the file (rewritten atomically), so those prompts are tried again."""
    done: set[int] = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    keep = []
    for n, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
            ok = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if n == len(lines) and (not ok or not raw.endswith(b"\n")):
            break  # cut short by a kill: drop it and redo that prompt
        if not ok:
            raise UserError(f"{path} line {n} is not JSON; it is not an output file of llama-cli --output jsonl; "
                            "choose another --output_file")
        if rec is None:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
            raise UserError(f"{path} line {n} has no result index; it was not written by llama-cli "
                            "--output jsonl; choose another --output_file")
        i = rec["index"]
        if i >= len(requests) or requests[i].prompt != rec.get("prompt"):
            raise UserError(f"{path} line {n} answers a prompt that is not prompt {i + 1} of this input; "
                            "use another --output_file, or the prompts it was written for")
        if "error" not in rec:
            done.add(i)
            keep.append(raw)
    kept = b"".join(keep)
    if kept != data:
        tmp = path + ".resume-tmp"
        with open(tmp, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done


class ResultWriter:
    """Writes results to stdout (if given) in input order and, as they finish, to an output file."""

    def __init__(self, fmt: str, stdout: Optional[IO], output_file: Optional[str], echo: bool,
                 expected: list[int]):
        self.fmt, self.stdout, self.echo = fmt, stdout, echo
        self.file = open(output_file, "a", encoding="utf-8") if output_file else None
        self.expected = list(expected)  # indices to print, in order
        self.next = 0
        self.pending: dict[int, Result] = {}

    def add(self, result: Result) -> None:
        if self.file is not None:
            self.file.write(self.format(result))
            self.file.flush()
            os.fsync(self.file.fileno())
        self.pending[result.request.index] = result
        while self.next < len(self.expected) and self.expected[self.next] in self.pending:
            r = self.pending.pop(self.expected[self.next])
            self.next += 1
            if self.stdout is None:
                continue
            if r.error is not None and self.fmt == "text":
                print(f"llama-cli: prompt {r.request.index + 1}: {r.error}", file=sys.stderr)
            else:
                self.stdout.write(self.format(r))
                self.stdout.flush()

    def format(self, r: Result) -> str:
        if self.fmt == "jsonl":
            return json.dumps(r.record(), ensure_ascii=False) + "\n"
        if r.error is not None:
            return f"[error: prompt {r.request.index + 1}: {r.error}]\n\n"
        text = r.generation if self.echo else r.request.prompt + r.generation
        return text + "\n\n"

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
