"""The `llama-cli` command (also `python -m llama_cli`), built with fire.

Flags are checked into a `RunConfig` before any model is loaded. Errors print one line on
stderr and exit 2 (usage) or 1 (runtime); `--debug` shows the traceback. stdout carries
only results; logs, progress and timing go to stderr. torch is imported only when a run
starts, so `--help` is quick.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import fire

from .errors import LlamaCliError, UserError
from .tokenizer import find_tokenizer

log = logging.getLogger("llama_cli")

_PROMPT_FLAGS = ("--prompt", "-prompt")
_STR_FLAGS = ("ckpt_dir", "tokenizer_path", "prompts_file", "output", "output_file", "device", "dtype", "schedule",
              "compile")


@dataclass
class RunConfig:
    ckpt_dir: str
    tokenizer_path: str
    prompts: list
    prompts_file: Optional[str]
    temperature: float
    top_p: float
    top_k: Optional[int]
    max_seq_len: int
    max_gen_len: int
    max_batch_size: int
    seed: int
    logprobs: bool
    echo: bool
    device: Optional[str]
    dtype: Optional[str]
    output: str
    output_file: Optional[str]
    resume: bool
    stream: bool
    strict: bool
    quiet: bool
    schedule: str = "continuous"
    compile: str = "auto"


def _int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _num(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"--{name} must be a number, got {value!r}")
    return float(value)


def _flag(name, value):
    if not isinstance(value, bool):
        raise UserError(f"--{name} is a switch: write --{name} or --no{name}, not --{name} {value!r}")
    return value


def make_config(ckpt_dir, tokenizer_path, prompts, prompts_file, temperature, top_p, top_k, max_seq_len,
                max_gen_len, max_batch_size, seed, logprobs, echo, device, dtype, output, output_file, resume,
                stream, strict, quiet, schedule="continuous", compile="auto") -> RunConfig:
    """Check every flag; raise UserError naming the first bad one."""
    if ckpt_dir is None:
        raise UserError("--ckpt_dir is required: the folder with consolidated.NN.pth and params.json")
    ckpt_dir = str(ckpt_dir)
    if tokenizer_path is None:
        tokenizer_path = find_tokenizer(ckpt_dir)
    temperature, top_p = _num("temperature", temperature), _num("top_p", top_p)
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {temperature:g}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p:g}")
    top_k = _int("top_k", top_k, minimum=0, allow_none=True) or None
    max_seq_len = _int("max_seq_len", max_seq_len, minimum=2)
    max_gen_len = _int("max_gen_len", max_gen_len)
    max_batch_size = _int("max_batch_size", max_batch_size)
    seed = _int("seed", seed, minimum=0)
    for name, value in (("logprobs", logprobs), ("echo", echo), ("resume", resume), ("stream", stream),
                        ("strict", strict), ("quiet", quiet)):
        _flag(name, value)
    if compile not in ("auto", "on", "off"):
        raise UserError(f"--compile must be auto, on or off, got {compile!r}")
    if schedule not in ("continuous", "static"):
        raise UserError(f"--schedule must be continuous or static, got {schedule!r}")
    if output not in ("text", "jsonl"):
        raise UserError(f"--output must be text or jsonl, got {output!r}")
    if resume and not output_file:
        raise UserError("--resume needs --output_file: the file whose finished prompts should be skipped")
    if resume and output != "jsonl":
        raise UserError("--resume reads back the results, so it needs --output jsonl")
    if stream and output != "text":
        raise UserError("--stream prints text as it is generated; drop --output jsonl or --stream")
    return RunConfig(ckpt_dir, str(tokenizer_path), list(prompts or []), prompts_file, temperature, top_p, top_k,
                     max_seq_len, max_gen_len, max_batch_size, seed, logprobs, echo, device, dtype, output,
                     output_file, resume, stream, strict, quiet, schedule, compile)


def check_output_file(path: Optional[str], resume: bool) -> None:
    """The output file can be appended to, and holds nothing that would be lost."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"--output_file {path} is a folder; give a file path")
    if os.path.exists(path) and os.path.getsize(path) > 0 and not resume:
        raise UserError(f"--output_file {path} already holds results; pass --resume to continue it, "
                        "or choose another file")
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"cannot write --output_file {path}: {e.strerror}; choose a writable path") from None


def complete(ckpt_dir=None, tokenizer_path=None, prompt=None, prompts_file=None, temperature=0.6, top_p=0.9,
             top_k=None, max_seq_len=512, max_gen_len=64, max_batch_size=4, seed=1, logprobs=False, echo=False,
             device=None, dtype=None, output="text", output_file=None, resume=False, stream=False, strict=False,
             quiet=False, debug=False, schedule="continuous", compile="auto"):
    """Complete text prompts with a LLaMA model (Meta checkpoint folder).

    Examples:
      llama-cli --ckpt_dir llama-2-7b --prompt "The capital of France is"
      llama-cli --ckpt_dir llama-2-7b --prompts_file prompts.jsonl --output jsonl --output_file out.jsonl --resume
      echo "Once upon a time" | llama-cli --ckpt_dir llama-2-7b --temperature 0
      torchrun --nproc_per_node 2 -m llama_cli --ckpt_dir llama-2-13b --prompt "Hi"

    Args:
      ckpt_dir: folder with consolidated.NN.pth shards and params.json (any shard count, any process count).
      tokenizer_path: tokenizer file; default: tokenizer.json or tokenizer.model in ckpt_dir, else
        tokenizer.model in its parent folder.
      prompt: text to complete; repeat --prompt for several. Always taken as text (42 stays "42").
      prompts_file: .txt (one prompt per line) or .jsonl (objects with "prompt" and optional "id",
        "max_gen_len", "temperature", "top_p"); "-" reads standard input. Without --prompt or
        --prompts_file, prompts are read from a piped standard input, one per line.
      temperature: sampling temperature; 0 is greedy (deterministic).
      top_p: nucleus sampling: draw only from the most likely tokens holding this much probability.
      top_k: also limit sampling to the k most likely tokens (default: no limit).
      max_seq_len: longest prompt + completion, in tokens (sizes the KV cache).
      max_gen_len: most tokens to generate per prompt.
      max_batch_size: prompts decoded together; prompt files run in batches of this size.
      seed: random seed; the same seed gives the same samples.
      logprobs: also report each generated token's log-probability (jsonl output).
      echo: include the prompt tokens in the generation (and its logprobs).
      device: cpu, cuda, cuda:N or mps; default: this rank's GPU if there is one, else cpu.
      dtype: fp32, bf16 or fp16; default: bf16 on GPUs that support it, fp16 on others, fp32 on cpu.
      output: text (prompt followed by its completion) or jsonl (one object per prompt: id, index,
        prompt, generation, tokens, and logprobs when asked).
      output_file: also append each result to this file as soon as it is done (flushed).
      resume: skip prompts whose results are already in --output_file (needs --output jsonl).
      stream: print the completion token by token as it is generated (one prompt).
      strict: stop at the first prompt that cannot run (too long) instead of writing an error entry.
      quiet: no logs or progress on stderr, only errors.
      debug: show the Python traceback on errors.
      schedule: continuous (a finished prompt's batch slot is refilled at once: best for prompt
        files) or static (Meta's: each batch runs until its longest completion ends).
      compile: compile the decoding step with torch.compile: on, off, or auto (on for GPUs; on the CPU,
        where it speeds up only 1-2 rows and takes ~30 s to compile, for --max_batch_size 1-2 and
        jobs of 4096+ tokens). Compiled kernels are cached on disk.

    Exit codes: 0 done; 2 bad usage or input; 1 failure while running, or some prompts got error entries.
    Multi-node: torchrun --nnodes N --node_rank R --nproc_per_node G --rdzv_backend c10d
      --rdzv_endpoint HOST:PORT -m llama_cli ... (see README).
    """
    cfg = make_config(ckpt_dir, tokenizer_path, prompt, prompts_file, temperature, top_p, top_k, max_seq_len,
                      max_gen_len, max_batch_size, seed, logprobs, echo, device, dtype, output, output_file,
                      resume, stream, strict, quiet, schedule, compile)
    return run(cfg)


def run(cfg: RunConfig, stdin=None, stdout=None) -> int:
    from . import distributed
    from .prompts import PromptRequest, ResultWriter, read_prompts, scan_output
    from .scheduler import Defaults, run_continuous, run_static

    stdout = stdout or sys.stdout
    world_size, rank, _ = distributed.world()
    setup_logging(quiet=cfg.quiet or rank != 0)
    requests: list = []
    done: set = set()
    if rank == 0:  # only rank 0 reads prompts and output files; the others get them below
        requests = read_prompts(cfg.prompts, cfg.prompts_file, stdin)
        if cfg.stream and len(requests) != 1:
            raise UserError(f"--stream prints one completion as it is generated; got {len(requests)} prompts")
        check_output_file(cfg.output_file, cfg.resume)
        if cfg.resume:
            done = scan_output(cfg.output_file, requests)
            log.info("resuming: %d of %d prompts already in %s", len(done), len(requests), cfg.output_file)

    from .generation import Llama

    t0 = time.perf_counter()
    work = sum((r.max_gen_len or cfg.max_gen_len) for r in requests if r.index not in done)
    llama = Llama.build(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size, seed=cfg.seed,
                        device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, expected_tokens=work or None)
    load_s = time.perf_counter() - t0
    pending = [r.to_json() for r in requests if r.index not in done]
    pending = [PromptRequest(**r) for r in distributed.broadcast_json(pending, llama.device)]
    if not pending:
        log.info("nothing to do: every prompt already has a result in %s", cfg.output_file)
        return 0

    sink = stdout if rank == 0 else open(os.devnull, "w")
    # with --stream the text goes out as it is made; the writer then keeps only --output_file
    writer = ResultWriter(cfg.output, None if cfg.stream else sink, cfg.output_file if rank == 0 else None,
                          cfg.echo, [r.index for r in pending])
    progress = Progress(len(pending), enabled=rank == 0 and not cfg.quiet and not cfg.stream and len(pending) > 1)
    streamer = Streamer(llama.tokenizer, pending[0], sink, cfg.echo) if cfg.stream else None
    # A prompt given on the command line that cannot run is a usage error; in a file it gets an error entry.
    strict = cfg.strict or bool(cfg.prompts)
    defaults = Defaults(cfg.max_gen_len, cfg.temperature, cfg.top_p, cfg.top_k, cfg.logprobs, cfg.echo, strict)
    t1 = time.perf_counter()
    try:
        schedule = run_continuous if cfg.schedule == "continuous" else run_static
        def on_result(result):
            if streamer is not None:
                streamer.finish(result)
            writer.add(result)

        stats = schedule(llama, pending, defaults, on_result=on_result, on_progress=progress.update,
                         on_step=streamer.step if streamer else None)
    finally:
        writer.close()
    gen_s = time.perf_counter() - t1
    progress.close()
    ttft = f", first token after {stats.first_token_s:.2f} s" if stats.first_token_s is not None else ""
    log.info("%d prompt(s), %d tokens in %.2f s (%.1f tokens/s)%s; model load %.2f s", stats.prompts, stats.tokens,
             gen_s, stats.tokens / max(gen_s, 1e-9), ttft, load_s)
    if stats.errors:
        log.warning("%d of %d prompts could not run; see their error entries", stats.errors, len(pending))
        return 1
    return 0


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
    """Prints one completion as its tokens arrive; text is decoded from all tokens so far, so
    multi-byte characters and SentencePiece spaces come out right."""

    def __init__(self, tokenizer, request, out, echo: bool):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""
        self.stopped = False
        self.out.write(request.prompt if not echo else "")
        self.out.flush()
        self.echo = echo

    def step(self, tokens: list[int]) -> None:
        if self.stopped:
            return
        if tokens[0] in self.tokenizer.stop_ids:
            self.stopped = True
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self, result) -> None:
        text = result.generation
        if result.error is not None:
            raise UserError(f"prompt {result.request.index + 1}: {result.error}")
        if not self.echo and text.startswith(self.printed):
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


def literal_args(argv: list[str], fn=None, str_flags=_STR_FLAGS) -> list[str]:
    """Check argv against fn's flags and rewrite it so fire takes text as text.

    fire types every value by its look (`--prompt 42` arrives as an int, `--prompt "a, b"`
    as a tuple), keeps only the last of a repeated flag, and hands flags it does not know
    to the function's *result* after running it. So unknown flags are refused here, every
    --prompt is gathered into one list, and text values are passed as Python string
    literals, which fire reads back unchanged.
    """
    fn = fn or complete
    params = inspect.signature(fn).parameters
    switches = {n for n, p in params.items() if isinstance(p.default, bool)}
    short = {}
    for n in params:
        if sum(1 for m in params if m[0] == n[0]) == 1:
            short[n[0]] = n
    prompts, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv
        if not arg.startswith("-") or arg == "-":
            raise UserError(f"unexpected argument {arg!r}; text to complete goes after --prompt "
                            "(see llama-cli --help)")
        flag, eq, value = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        name = short.get(name, name) if flag.startswith("-") and not flag.startswith("--") else name
        if name in switches or name.startswith("no") and name[2:] in switches:
            rest.append(arg if not eq else f"--{name}={value}")
            i += 1
            continue
        if name not in params:
            raise UserError(f"unknown flag {flag}; see llama-cli --help for the flags")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        if name == "prompt":
            prompts.append(value)
        elif name in str_flags:
            rest += [f"--{name}", repr(value)]
        else:
            rest += [f"--{name}", value]
        i += 1
    if prompts:
        rest += ["--prompt", repr(prompts)]
    return rest


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: exits with 0, 1 or 2."""
    sys.exit(cli(argv))


def cli(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] in _subcommands():
            name, argv = argv[0], argv[1:]
            fn, str_flags = _subcommands()[name]
            if any(a in ("--help", "-h") for a in argv):
                return _help(fn, f"llama-cli {name}")
            setup_logging(quiet="--quiet" in argv)
            argv = literal_args([a for a in argv if a not in ("--debug", "--quiet")], fn, str_flags)
        else:
            if any(a in ("--help", "-h") for a in argv):
                return _help(complete, "llama-cli")
            argv = literal_args(argv)
            fn = complete
        result = fire.Fire(fn, command=argv, name="llama-cli", serialize=lambda _: None)
        return result if isinstance(result, int) else 0
    except fire.core.FireExit as e:
        return e.code
    except LlamaCliError as e:
        return _fail(e, e.exit_code, debug)
    except KeyboardInterrupt:
        print("llama-cli: interrupted; results already written to --output_file are kept (use --resume)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 - anything else is a runtime failure, reported in one line
        if type(e).__name__ == "OutOfMemoryError":
            msg = "out of memory while running; lower --max_batch_size or --max_seq_len"
            return _fail(RuntimeError(msg), 1, debug, e)
        return _fail(e, 1, debug, prefix=f"{type(e).__name__}: ")


def _help(fn, name: str) -> int:
    """fire's help text, on stdout (fire itself writes it to stderr)."""
    import fire.helptext
    import fire.trace

    print(fire.helptext.HelpText(fn, fire.trace.FireTrace(fn, name=name)))
    return 0


def _fail(e: BaseException, code: int, debug: bool, original: BaseException = None, prefix: str = "") -> int:
    if debug:
        import traceback

        traceback.print_exception(original or e)
    text = " ".join(str(e).split()) or type(e).__name__
    hint = "" if debug or isinstance(e, UserError) else " (rerun with --debug for the traceback)"
    print(f"llama-cli: error: {prefix}{text}{hint}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _subcommands() -> dict:
    """name -> (function, its text flags); imported only when used."""
    from .convert import convert
    from .reshard import reshard

    return {"reshard": (reshard, ("ckpt_dir", "out", "dtype", "tokenizer_path")),
            "convert": (convert, ("src", "out", "dtype"))}
