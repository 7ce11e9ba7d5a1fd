"""The `llama-cli` command (also `python -m llama_cli`), built with fire.

Flags are checked into a `RunConfig` (config.py) before any model is loaded. Errors print one line on
stderr and exit 2 (usage) or 1 (runtime); `--debug` shows the traceback. stdout carries
only results; logs, progress and timing go to stderr. torch is imported only when a run
starts, so `--help` is quick.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import time
from typing import Optional

import fire

from . import __version__
from .config import RunConfig
from .errors import LlamaCliError, UserError
from .flags import literal_args, tidy_help

log = logging.getLogger("llama_cli")



def stdout_open(what: str, fix: str = "run with standard output open") -> None:
    """A UserError where standard output is closed (`>&-`: Python then drops every print), saying what would be
    lost."""
    if sys.stdout is None:
        raise UserError(f"standard output is closed, so {what} would go nowhere; {fix}")


def check_output_file(path: Optional[str], resume: bool) -> None:
    """The output file can be appended to, and holds nothing that would be lost."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"--output_file {path} is a folder; give a file path")
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe (>(command), a FIFO): opened once, by the
        # writer (opening it here too would end a FIFO's reader)
        if resume:
            raise UserError(f"--resume reads back --output_file, and {path} is not a file (a pipe?); give a file")
        return
    if os.path.exists(path) and os.path.getsize(path) > 0 and not resume:
        raise UserError(f"--output_file {path} already holds results; pass --resume to continue it, "
                        "or choose another file")
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"cannot write --output_file {path}: {e.strerror}; choose a writable path") from None


def nothing_to_do(output_file: str) -> int:
    log.info("nothing to do: every prompt already has a result in %s", output_file)
    return 0


def run(cfg: RunConfig, stdin=None, stdout=None) -> int:
    """One generation run; the --output_file lock it takes is let go when it ends, however it ends."""
    held: list = []
    try:
        return _run(cfg, stdin, stdout, held)
    finally:
        for lock in held:
            lock.release()


def _run(cfg: RunConfig, stdin, stdout, held: list) -> int:
    from . import distributed
    from .prompts import PromptRequest, ReaderEnds, ResultWriter
    from .scheduler import Options, run_continuous, run_static

    stdout = stdout or sys.stdout
    world_size, rank, local_rank = distributed.world()
    setup_logging(quiet=cfg.quiet or rank != 0)
    if stdout is None and rank == 0 and not cfg.output_file:
        stdout_open("the results", "give --output_file, or run with standard output open")
    requests, done = read_inputs(cfg, stdin, held) if rank == 0 else ([], set())  # the others get them below

    from .generation import Llama

    t0 = time.perf_counter()
    pending = [r for r in requests if r.index not in done]
    if world_size == 1 and not pending:  # said before loading the model (under torchrun, once it is loaded)
        return nothing_to_do(cfg.output_file)
    # a KV cache for as many rows as the prompts can use: one prompt needs one, not --max_batch_size's (memory;
    # the batch size `llama-cli compile` kept a step for). Under torchrun every rank has the --prompt texts, but
    # only rank 0 has read a prompts file (the process group that could send it is made in build, after checks)
    known = len(pending) if world_size == 1 else len(cfg.prompt)
    rows = min(cfg.max_batch_size, known) if known else cfg.max_batch_size
    work = sum(r.settings.max_gen_len for r in pending)
    llama = Llama.build(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, rows, seed=cfg.seed,
                        device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                        expected_tokens=work or None, chat_format=cfg.chat_format, quantize=cfg.quantize,
                        group_size=cfg.group_size, kv_cache_dtype=cfg.kv_cache_dtype, threads=cfg.threads)
    load_s = time.perf_counter() - t0
    if world_size > 1:
        pending = [PromptRequest.from_json(r) for r in distributed.broadcast_json([r.to_json() for r in pending],
                                                                                  llama.device)]
        if not pending:
            return nothing_to_do(cfg.output_file)

    sink = stdout if rank == 0 else open(os.devnull, "w")
    # with --stream the text goes out as it is made; the writer then keeps only --output_file
    writer = ResultWriter(cfg.output, None if cfg.stream else sink, cfg.output_file if rank == 0 else None,
                          cfg.echo, [r.index for r in pending])
    progress = Progress(len(pending), enabled=rank == 0 and not cfg.quiet and not cfg.stream and len(pending) > 1)
    # (under torchrun a reader that ends stops every rank at one result: on_result)
    streamer = Streamer(llama.tokenizer, pending[0], ReaderEnds(sink) if world_size > 1 else sink, cfg.echo) \
        if cfg.stream else None
    # A prompt given on the command line that cannot run is a usage error; in a file it gets an error entry.
    opts = Options(cfg.logprobs, cfg.echo, strict=cfg.strict or bool(cfg.prompt), share_prefixes=cfg.share_prefixes)
    warm0 = llama.engine.warmup_s
    t1 = time.perf_counter()
    try:
        schedule = run_continuous if cfg.schedule == "continuous" else run_static

        def on_result(result):
            if streamer is not None:
                streamer.finish(result)
            if world_size == 1:
                return writer.add(result)  # a closed standard output (`| head`) ends the run here: exit 0
            try:
                writer.add(result)  # (with --output_file the run goes on into the file: no error)
                gone = streamer is not None and streamer.out.closed_by_reader() and writer.file is None
            except BrokenPipeError:
                gone = True
            # under torchrun the other ranks are told at the same result, and all stop there (exit 0): left
            # going, they failed at their next collective with rank 0 gone ("Connection closed by peer")
            if distributed.broadcast_json(gone, llama.device):
                raise BrokenPipeError

        stats = schedule(llama, pending, opts, on_result=on_result, on_progress=progress.update,
                         on_step=streamer.step if streamer else None)
    finally:
        writer.close()
    gen_s = time.perf_counter() - t1
    progress.close()
    log.info("%s", summary(stats, gen_s, llama.engine.warmup_s - warm0, load_s))
    return _closing_lines(stats, len(pending), cfg.max_seq_len)


def _closing_lines(stats, n: int, max_seq_len: int) -> int:
    """What a run of n prompts has to say after its summary (shared beginnings, prompts cut by --max_seq_len,
    prompts that could not run), on stderr; the exit code: 1 where some prompts got error entries."""
    if stats.shared_prompts:
        log.info("%d of %d prompts began as another in the batch did: %d prompt tokens copied, not computed "
                 "(--noshare_prefixes computes them)", stats.shared_prompts, n, stats.shared_tokens)
    if stats.cut_by_max_seq_len:
        log.warning("%d of %d prompts ran into --max_seq_len %d before their max_gen_len (finish_reason "
                    "\"max_seq_len\"); raise --max_seq_len for longer completions", stats.cut_by_max_seq_len,
                    n, max_seq_len)
    if stats.errors:
        log.warning("%d of %d prompts could not run; see their error entries", stats.errors, n)
        return 1
    return 0


def read_inputs(cfg: RunConfig, stdin, held: list) -> tuple[list, set]:
    """(the prompts, the indices --resume finds answered), every check done before the model loads; the output
    file's lock goes into `held`."""
    from .prompts import OutputLock, read_prompts, scan_output

    requests = read_prompts(cfg.prompt, cfg.prompts_file, stdin, defaults=cfg.settings)
    if cfg.stream and len(requests) != 1:
        raise UserError(f"--stream prints one completion as it is generated; got {len(requests)} prompts")
    check_output_file(cfg.output_file, cfg.resume)
    if cfg.output_file and os.path.isfile(cfg.output_file):  # not a pipe
        held.append(OutputLock(cfg.output_file))
    check_dialogs(requests, cfg.tokenizer_path, cfg.chat_format)
    done: set = set()
    if cfg.resume:
        done = scan_output(cfg.output_file, requests)
        for lock in held:
            lock.follow()
        log.info("resuming: %d of %d prompts already in %s", len(done), len(requests), cfg.output_file)
    return requests, done


def check_dialogs(requests, tokenizer_path: str, chat_format: str) -> None:
    """Render every dialog with the chat format now, before the model loads: a template that fails on a
    line is reported with that line."""
    dialogs = [r for r in requests if r.messages is not None]
    if not dialogs:
        return
    from .chat import pick_format
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    fmt = pick_format(tokenizer, tokenizer_path, chat_format)
    for r in dialogs:
        try:
            fmt.encode(r.messages, tokenizer)
        except UserError as e:
            raise UserError(f"{r.source or f'prompt {r.index + 1}'}: {e}") from None


def summary(stats, gen_s: float, warmup_s: float, load_s: float) -> str:
    """The closing line on stderr: generation rate with compiling and graph capture excluded, time to
    first token, and those one-off costs apart."""
    rate_s = max(gen_s - warmup_s, 1e-9)
    parts = [f"{stats.prompts} prompt(s), {stats.tokens} tokens in {gen_s:.2f} s: "
             f"{stats.tokens / rate_s:.1f} tokens/s generating"]
    if stats.first_token_s is not None:
        parts.append(f"first token after {stats.first_token_s:.2f} s")
    if warmup_s >= 0.005:
        parts.append(f"compiling/capturing the decode step {warmup_s:.2f} s (not counted in tokens/s)")
    parts.append(f"model load {load_s:.2f} s")
    return "; ".join(parts)


class Progress:
    """prompts done/total, tokens/s and ETA on stderr, at most once a second (and at the end)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()
        self.shown = False

    def update(self, stats) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 1.0 and stats.prompts + stats.errors < self.total):
            return
        self.last = now
        done = stats.prompts + stats.errors
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (f"llama-cli: {done}/{self.total} prompts, {stats.tokens / max(elapsed, 1e-9):.1f} tokens/s, "
                f"ETA {_duration(eta)}")
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")


class Streamer:
    """Prints one completion as its tokens arrive: decoded from all tokens so far (so multi-byte
    characters and SentencePiece spaces come out right), never half a character or part of a stop text."""

    def __init__(self, tokenizer, request, out, echo: bool):
        from .stopping import StopText

        self.tokenizer, self.out, self.echo = tokenizer, out, echo
        self.watch = StopText(tokenizer, request.settings.stop)
        self.ids: list[int] = []
        self.printed = ""
        self.stopped = False
        self.out.write(request.prompt if request.messages is None else "")
        self.out.flush()

    def step(self, tokens: list[int]) -> None:
        if self.stopped:
            return
        if tokens[0] in self.tokenizer.stop_ids:
            self.stopped = True
            return
        self.ids.append(tokens[0])
        self.stopped = self.watch.update(self.ids)
        text = self.watch.safe_text()
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, result) -> None:
        if result.error is not None:
            raise UserError(f"prompt {result.request.index + 1}: {result.error}")
        text = result.generation
        if self.echo and text.startswith(result.request.prompt):
            text = text[len(result.request.prompt):]
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llama-cli: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: exits with 0, 1 or 2."""
    sys.exit(cli(argv))


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's time limit) ends a one-process run as Ctrl-C does: the same one-line
    message, results already in --output_file kept, exit code 143. Under torchrun SIGTERM keeps its default
    (the launcher sends it to stop the workers when one has failed, and a worker waiting in a collective for
    the failed one runs no Python handler: it must die at once)."""


def _terminate(signum, frame):
    raise Terminated


def cli(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    installed, previous = False, None
    if os.environ.get("WORLD_SIZE", "1") == "1":
        try:
            previous, installed = signal.signal(signal.SIGTERM, _terminate), True
        except ValueError:  # not the main thread: SIGTERM keeps its handler
            pass
    try:
        return _cli(argv, debug)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _cli(argv: list[str], debug: bool) -> int:
    try:
        if argv[:1] == ["--version"]:
            print(f"llama-cli {__version__}")
            return 0
        if argv and argv[0] in _subcommands():
            name, argv = argv[0], ["--quiet" if a == "-q" else a for a in argv[1:]]  # -q is --quiet everywhere
            fn, str_flags = _subcommands()[name]
            if any(a in ("--help", "-h") for a in argv):
                return _help(fn, f"llama-cli {name}")
            setup_logging(quiet="--quiet" in argv or os.environ.get("RANK", "0") != "0")  # rank 0 tells
            if name in ONE_PROCESS and os.environ.get("WORLD_SIZE", "1") != "1":  # each would write the folder
                e = UserError(f"llama-cli {name} runs in one process (it reads and writes whole checkpoints), and "
                              f"WORLD_SIZE={os.environ['WORLD_SIZE']} makes this one of several: run it without "
                              "torchrun (or unset WORLD_SIZE and RANK)")
                e.every_rank = "MASTER_ADDR" not in os.environ  # not torchrun's: a stray RANK=1 must say it too
                raise e
            keep_quiet = "quiet" in inspect.signature(fn).parameters
            argv = literal_args([a for a in argv if a != "--debug" and (keep_quiet or a != "--quiet")], fn, str_flags,
                                f"llama-cli {name}")
            result = fire.Fire(fn, command=argv, name=f"llama-cli {name}", serialize=lambda _: None)
            return result if isinstance(result, int) else 0
        if any(a in ("--help", "-h") for a in argv):
            return _help(RunConfig, "llama-cli")
        cfg = fire.Fire(RunConfig, command=literal_args(argv), name="llama-cli", serialize=lambda _: None)
        return run(cfg)
    except fire.core.FireExit as e:
        return e.code
    except LlamaCliError as e:
        return _fail(e, e.exit_code, debug)
    except KeyboardInterrupt as e:
        kept = " results already written to --output_file are kept (rerun with --resume)" \
            if any(a.split("=")[0] == "--output_file" for a in argv) else ""
        what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"llama-cli: {what};{kept or ' nothing was saved'}", file=sys.stderr)
        return code
    except BrokenPipeError:
        from .prompts import silence

        silence(sys.stdout)
        return 0
    except Exception as e:  # noqa: BLE001 - anything else is a runtime failure, reported in one line
        if type(e).__name__ == "OutOfMemoryError":
            msg = "out of memory while running; lower --max_batch_size or --max_seq_len"
            return _fail(RuntimeError(msg), 1, debug, e)
        if isinstance(e, OSError) and e.strerror:  # the system's words say it: "No space left on device: 'x'"
            where = f": {e.filename!r}" if e.filename else ""
            return _fail(RuntimeError(f"{e.strerror}{where}"), 1, debug, e)
        return _fail(e, 1, debug, prefix=f"{type(e).__name__}: ")


def _help(fn, name: str) -> int:
    """fire's help text, tidied, on stdout (fire itself writes it to stderr)."""
    import fire.helptext
    import fire.trace

    print(tidy_help(fire.helptext.HelpText(fn, fire.trace.FireTrace(fn, name=name)), name))
    return 0


def _fail(e: BaseException, code: int, debug: bool, original: BaseException = None, prefix: str = "") -> int:
    """One line on stderr. Under torchrun every rank fails alike on a usage error: rank 0 alone says so."""
    if debug:
        import traceback

        traceback.print_exception(original or e)
    if isinstance(e, UserError) and not e.every_rank and os.environ.get("RANK", "0") != "0":
        return code
    text = " ".join(str(e).split()) or type(e).__name__
    # our own errors say what to do; anything else may need its traceback
    hint = "" if debug or isinstance(e, LlamaCliError) else " (rerun with --debug for the traceback)"
    print(f"llama-cli: error: {prefix}{text}{hint}", file=sys.stderr)
    return code


ONE_PROCESS = ("convert", "quantize", "reshard")  # commands that write a folder; the others run under torchrun


def _subcommands() -> dict:
    """name -> (function, its text flags); imported only when used."""
    from .compile_step import compile_step
    from .convert import convert
    from .convert.quantize import quantize_checkpoint
    from .converse import chat
    from .perplexity import perplexity
    from .reshard import reshard

    return {"reshard": (reshard, ("ckpt_dir", "out", "dtype", "tokenizer_path")),
            "convert": (convert, ("src", "out", "dtype")),
            "quantize": (quantize_checkpoint, ("ckpt_dir", "out", "mode", "dtype", "tokenizer_path")),
            "compile": (compile_step, ("ckpt_dir", "tokenizer_path", "device", "dtype", "kv_cache_dtype", "quantize")),
            "chat": (chat, ("ckpt_dir", "tokenizer_path", "system", "chat_format", "output", "device", "dtype",
                            "kv_cache_dtype", "quantize", "compile", "cuda_graphs")),
            "perplexity": (perplexity, ("ckpt_dir", "text_file", "tokenizer_path", "output", "device", "dtype",
                                        "kv_cache_dtype", "quantize"))}
