"""Prompts in (flags, .txt/.jsonl files, stdin) and results out (stdout and --output_file).

A prompt file is read and checked whole before any model is loaded, so a bad line is
reported at once with its line number (and each prompt's settings resolved, settings.py).
Results go to --output_file as soon as each is finished (appended and flushed), and to stdout
in input order. With --resume, prompts whose results are already in the output file are
skipped; a line cut short by a killed run is dropped and redone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Optional

from .errors import RuntimeFailure, UserError
from .locks import BUSY, try_lock
from .settings import KEYS, Settings, check_text, resolve

log = logging.getLogger("llama_cli")
_warned: set = set()


@dataclass
class PromptRequest:
    index: int  # position in the input, 0-based
    prompt: str  # the text to complete (for a dialog: its last user message, for display)
    settings: Settings = field(default_factory=Settings)  # flags + this prompt's overrides, checked
    id: Any = None
    messages: Optional[list] = None  # a dialog (chat.py) instead of a text prompt
    source: Optional[str] = field(default=None, compare=False)  # "file line N", for error messages

    def to_json(self) -> dict:
        out = {"index": self.index, "prompt": self.prompt, "settings": self.settings.to_json()}
        if self.id is not None:
            out["id"] = self.id
        if self.messages is not None:
            out["messages"] = self.messages
        return out

    @classmethod
    def from_json(cls, d: dict) -> "PromptRequest":
        return cls(d["index"], d["prompt"], Settings.from_json(d["settings"]), d.get("id"), d.get("messages"))

    def same_input(self, rec: dict) -> bool:
        """Whether an output record answers this prompt (for --resume)."""
        if self.messages is not None:
            return rec.get("messages") == self.messages
        return rec.get("prompt") == self.prompt


@dataclass
class Result:
    request: PromptRequest
    generation: str = ""
    tokens: list = field(default_factory=list)
    logprobs: Optional[list] = None
    error: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop", "length" or "max_seq_len"

    def record(self) -> dict:
        out = {}
        if self.request.id is not None:
            out["id"] = self.request.id
        out["index"] = self.request.index
        if self.request.messages is not None:
            out["messages"] = self.request.messages
        else:
            out["prompt"] = self.request.prompt
        if self.error is not None:
            out["error"] = self.error
            return out
        out["generation"] = self.generation
        if self.request.messages is not None:
            out["message"] = {"role": "assistant", "content": self.generation}
        out["tokens"] = self.tokens
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        out["finish_reason"] = self.finish_reason
        return out


def read_prompts(prompts: Optional[list], prompts_file: Optional[str], stdin: IO = None,
                 defaults: Settings = Settings()) -> list[PromptRequest]:
    """Prompts from --prompt, else --prompts_file, else a piped stdin. Each gets its settings:
    `defaults` (the flags) with the prompt's own overrides, checked here, before any model loads."""
    if prompts and prompts_file:
        raise UserError("give prompts with --prompt or --prompts_file, not both")
    if prompts:
        for i, p in enumerate(prompts):
            if p.strip() == "":
                raise UserError(f"prompt {i + 1} is empty; give some text to complete")
            check_text(p, f"--prompt {i + 1}")
        return [PromptRequest(i, p, defaults) for i, p in enumerate(prompts)]
    if prompts_file and prompts_file != "-":
        if os.path.isdir(prompts_file):
            raise UserError(f"--prompts_file {prompts_file} is a folder; give a .txt, .jsonl or .json file")
        if not os.path.exists(prompts_file):
            raise UserError(f"prompts file {prompts_file} does not exist")
        lower = prompts_file.lower()
        if lower.endswith(".json"):
            return _read_json_array(prompts_file, defaults)
        # a pipe (a shell's <(command), a FIFO) is read as standard input is: JSONL if it starts like it
        kind = "jsonl" if lower.endswith(".jsonl") else "text" if os.path.isfile(prompts_file) else "auto"
        with open(prompts_file, "rb") as f:
            return _read_lines(f, prompts_file, kind, defaults)
    stdin = stdin if stdin is not None else sys.stdin
    if not prompts_file and (stdin is None or stdin.isatty()):
        raise UserError("no prompt given; pass --prompt TEXT, --prompts_file FILE (.txt, .jsonl or .json), "
                        "or pipe prompts on standard input")
    return _read_lines(_stdin_lines(stdin), "<stdin>", "auto", defaults)


def _stdin_lines(stdin) -> Iterable[bytes]:
    stdin = stdin if stdin is not None else sys.stdin
    return getattr(stdin, "buffer", stdin)


def _looks_like_jsonl(line: str) -> bool:
    """A line that is a JSON object with a "prompt" or "messages": standard input then carries JSONL."""
    if not line.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("prompt" in obj or "messages" in obj)


def _read_lines(lines: Iterable, name: str, kind: str, defaults: Settings) -> list[PromptRequest]:
    """kind: "text" (one prompt per line), "jsonl", or "auto" (standard input: JSONL when its first
    line is a JSON object with a "prompt", a JSON array as a .json file holds when it starts with "[",
    else text)."""
    if kind == "auto":
        lines = list(lines)
        array = _whole_json_array(lines)
        if array is not None:
            return _json_array(array, name, defaults)
    out = []
    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte order mark
                    raise UserError(f"{name} is UTF-16 text; save the file as UTF-8") from None
                raise UserError(f"{name} line {lineno} is not UTF-8 text; save the file as UTF-8") from None
        else:
            line = raw
        if "\x00" in line:  # no text has NUL bytes: a model file, an archive, UTF-16 text
            raise UserError(f"{name} line {lineno} holds NUL bytes: it is a binary file (or UTF-16), not prompts; "
                            "give a UTF-8 text, .jsonl or .json prompts file")
        line = line.rstrip("\r\n")
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        if kind == "auto":
            kind = "jsonl" if _looks_like_jsonl(line) else "text"
        where = f"{name} line {lineno}"
        if kind == "jsonl":
            out.append(_from_object(_parse_json_line(line, where), where, len(out), defaults))
        else:
            out.append(PromptRequest(len(out), line, defaults))
    if not out:
        raise UserError(f"{name} holds no prompts")
    return out


def _whole_json_array(lines: list) -> Optional[str]:
    """The text of a stream that is one JSON array (as a .json file holds), else None: text lines that start
    with "[" (say "[INST] ...") stay text lines."""
    first = next((x for x in lines if x.strip()), b"")
    head = first if isinstance(first, str) else first.decode("utf-8", errors="replace")
    if not head.lstrip("\ufeff").lstrip().startswith("["):
        return None  # the common case: no copy of the whole stream
    try:
        text = b"".join(x if isinstance(x, bytes) else x.encode() for x in lines).decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        return None  # the line reader names the line
    try:
        return text if isinstance(json.loads(text), list) else None
    except json.JSONDecodeError:
        return None


def _read_json_array(path: str, defaults: Settings) -> list[PromptRequest]:
    """A .json file: an array of prompts, each a string or an object like a JSONL line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the file as UTF-8") from None
    return _json_array(text, path, defaults)


def _json_array(text: str, path: str, defaults: Settings) -> list[PromptRequest]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); a .json prompts "
                        'file holds an array like ["first prompt", {"prompt": "second", "max_gen_len": 32}]') from None
    if not isinstance(data, list):
        raise UserError(f'{path} must hold a JSON array of prompts like ["first prompt", {{"prompt": "second"}}], '
                        f"not {type(data).__name__}; for one object per line use a .jsonl file")
    out = []
    for i, item in enumerate(data):
        where = f"{path} item {i + 1}"
        if isinstance(item, str):
            if not item.strip():
                raise UserError(f"{where} is an empty prompt; give some text to complete")
            check_text(item, where)
            out.append(PromptRequest(len(out), item, defaults))
        else:
            out.append(_from_object(item, where, len(out), defaults))
    if not out:
        raise UserError(f"{path} holds no prompts")
    return out


def _parse_json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); "
                        'each line must be an object like {"prompt": "..."}') from None


def _from_object(obj, where: str, index: int, defaults: Settings) -> PromptRequest:
    if not isinstance(obj, dict):
        raise UserError(f'{where} must be a JSON object like {{"prompt": "..."}}, not {type(obj).__name__}')
    _check_texts(obj, where)
    settings = resolve(defaults, {k: obj[k] for k in KEYS if k in obj}, where)
    _warn_unknown_keys(obj, where)
    if "messages" in obj:
        from .chat import check_dialog

        if "prompt" in obj:
            raise UserError(f'{where} has both "prompt" and "messages"; give one')
        messages = check_dialog(obj["messages"], where)
        return PromptRequest(index, messages[-1]["content"], settings, id=obj.get("id"), messages=messages,
                             source=where)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f'{where} has no "prompt" text' + ("" if prompt is None else f" (got {json.dumps(prompt)})"))
    if not prompt.strip():
        raise UserError(f"{where} has an empty prompt; give some text to complete")
    return PromptRequest(index, prompt, settings, id=obj.get("id"))


def _check_texts(value, where: str, key: str = "") -> None:
    """Every text in a parsed JSON value (keys too) is valid text, or a UserError names the key it is under."""
    if isinstance(value, str):
        check_text(value, f'{where}: "{key}"' if key else where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_texts(k, f"{where}: a key")
            _check_texts(v, where, key or k)
    elif isinstance(value, list):
        for v in value:
            _check_texts(v, where, key)


def _warn_unknown_keys(obj: dict, where: str) -> None:
    """Extra keys are fine (metadata kept in the file); say once per key that it is not a setting, with the
    setting it may be a typo of."""
    import difflib

    unknown = sorted(k for k in obj if k not in KEYS and k not in ("prompt", "id", "messages") and k not in _warned)
    if unknown:
        _warned.update(unknown)
        guesses = [difflib.get_close_matches(k, KEYS, n=1) for k in unknown]
        named = ", ".join(json.dumps(k) + (f" (did you mean {json.dumps(g[0])}?)" if g else "")
                          for k, g in zip(unknown, guesses))
        log.warning("%s: ignoring key(s) %s (the settings a prompt may carry: %s)", where, named, ", ".join(KEYS))


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
        if i >= len(requests) or not requests[i].same_input(rec):
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


def silence(stream) -> None:
    """Point `stream`'s descriptor at the null device: what its buffer still holds (flushed at exit) goes nowhere
    once its reader has gone, in place of a second broken-pipe error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class ReaderEnds:
    """Standard output whose reader may end (`| head`) under torchrun: writes after that go nowhere (silenced)
    instead of failing rank 0 alone, and closed_by_reader() tells, so that every rank can stop at one point."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def closed_by_reader(self) -> bool:
        return self.gone

    def write(self, text: str) -> None:
        self._do(self.stream.write, text)

    def flush(self) -> None:
        self._do(self.stream.flush)

    def _do(self, fn, *args) -> None:
        if self.gone:
            return
        try:
            fn(*args)
        except BrokenPipeError:
            self.gone = True
            silence(self.stream)


class OutputLock:
    """An exclusive lock (flock) on a regular --output_file while this run may write it: two runs appending to one
    file would each answer the prompts, and --resume would find every result twice. Released when the process ends.
    Where the file system has no locks (some network mounts) or the platform no fcntl, the run goes on unlocked."""

    def __init__(self, path: str):
        self.path, self.fd = path, None
        self._take()

    def _take(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if try_lock(fd) == BUSY:
            os.close(fd)
            raise UserError(f"--output_file {self.path} is being written by another llama-cli run now; wait for it "
                            "to end (then --resume), or choose another file")
        old, self.fd = self.fd, fd  # (held, or no locks here)
        if old is not None:
            os.close(old)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def follow(self) -> None:
        """After scan_output put a new file in the path's place: lock that one."""
        if self.fd is not None and os.fstat(self.fd).st_ino != os.stat(self.path).st_ino:
            self._take()


# Characters that JSON leaves raw in a string (json.dumps escapes those below 0x20) but that some readers take for
# the end of a line: Python's str.splitlines (all three) and JavaScript, whose line terminators include U+2028 and
# U+2029 (Go's JSON escapes those two for that reason). A model may write them (found in a random model's output
# by scripts/fuzz_processes.py); escaped, each result stays one line for every reader, with the same JSON value.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(record: dict) -> str:
    """One result as a line of JSONL: UTF-8 as it is, the characters above as escapes."""
    return json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


class ResultWriter:
    """Writes results to stdout (if given) in input order and, as they finish, to an output file."""

    def __init__(self, fmt: str, stdout: Optional[IO], output_file: Optional[str], echo: bool,
                 expected: list[int]):
        self.fmt, self.stdout, self.echo = fmt, stdout, echo
        self.file = open(output_file, "a", encoding="utf-8") if output_file else None
        self.path, self.saved, self.failed = output_file, 0, False
        # fsync where the file is a file: a pipe (a shell's >(command)) or a device has nothing to sync
        self.sync = self.file is not None and os.path.isfile(output_file)
        self.expected = list(expected)  # indices to print, in order
        self.next = 0
        self.pending: dict[int, Result] = {}

    def add(self, result: Result) -> None:
        if self.file is not None:
            try:
                self.file.write(self.format(result))
                self.file.flush()
                if self.sync:
                    os.fsync(self.file.fileno())
            except OSError as e:  # a full disk, say: what was written before stays, --resume goes on from it
                self.failed = True
                raise self._cannot_write(e) from None
            self.saved += 1
        self.pending[result.request.index] = result
        while self.next < len(self.expected) and self.expected[self.next] in self.pending:
            r = self.pending.pop(self.expected[self.next])
            self.next += 1
            if self.stdout is None:
                continue
            if r.error is not None and self.fmt == "text":
                print(f"llama-cli: prompt {r.request.index + 1}: {r.error}", file=sys.stderr)
            else:
                try:
                    self.stdout.write(self.format(r))
                    self.stdout.flush()
                except BrokenPipeError:
                    if self.file is None:
                        raise  # nothing else keeps the results: the run ends there (exit 0, as `| head` expects)
                    self._stdout_gone()
                except OSError as e:
                    raise RuntimeFailure(f"cannot write the results to standard output: {e.strerror}") from None

    def _stdout_gone(self) -> None:
        """Standard output's reader has ended (`| head`) while --output_file keeps the results: the run goes on
        into the file alone, which it would otherwise leave short with exit code 0."""
        log.warning("standard output was closed after %d result(s); the others go to --output_file %s only",
                    self.next - 1, self.path)
        silence(self.stdout)  # what is still in its buffer goes nowhere, now and at exit
        self.stdout = None

    def format(self, r: Result) -> str:
        if self.fmt == "jsonl":
            return json_line(r.record())
        if r.error is not None:
            return f"[error: prompt {r.request.index + 1}: {r.error}]\n\n"
        if r.request.messages is not None:  # a dialog: the assistant's reply
            return r.generation + "\n\n"
        text = r.generation if self.echo else r.request.prompt + r.generation
        return text + "\n\n"

    def _cannot_write(self, e: OSError) -> RuntimeFailure:
        if not self.sync:  # a pipe whose reader ended, a device: nothing kept to resume from
            why = "; whatever reads it stopped reading" if isinstance(e, BrokenPipeError) else ""
            return RuntimeFailure(f"cannot write to --output_file {self.path}: {e.strerror} (after {self.saved} "
                                  f"result(s)){why}")
        return RuntimeFailure(f"cannot write to --output_file {self.path}: {e.strerror}; the {self.saved} result(s) "
                              "written before are kept: free some space, then rerun with --resume")

    def close(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            try:
                f.close()  # flushes what a failed write left in its buffer: fails again where that one did
            except OSError as e:
                if not self.failed:
                    raise self._cannot_write(e) from None
