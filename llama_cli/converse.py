"""`llama-cli chat`: talk to a model in its chat format (chat.py).

On a terminal it is a conversation: replies stream as they are generated, the history is kept
(the oldest exchanges are dropped, with a note, when it would no longer fit --max_seq_len),
Ctrl-C stops a reply where it is (in one process), `/reset` starts over, Ctrl-D (or `/exit`) leaves.
With standard input piped, every line that is not blank is one user message answered on its own. A
reply may span lines; `--output jsonl` writes each as one JSON object on one line (what the completion
command writes for a dialog), for scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Iterable, Optional

from .errors import UserError
from .settings import check_text

log = logging.getLogger("llama_cli")

HELP = "(Ctrl-C stops a reply, /reset starts over, Ctrl-D leaves)"


def chat(ckpt_dir=None, tokenizer_path=None, system=None, chat_format="auto", temperature=0.6, top_p=0.9, top_k=0,
         min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=None,
         max_seq_len=2048, max_gen_len=512, seed=1, output="text", device=None, dtype=None, kv_cache_dtype="auto",
         quantize=None, group_size=None, compile="auto", cuda_graphs="auto", threads=None):
    """Chat with a model: interactively on a terminal, or one reply per line of piped standard input.

    Examples:
      llama-cli chat --ckpt_dir checkpoints/smollm2-135m
      echo "What is the capital of France?" | llama-cli chat --ckpt_dir checkpoints/smollm2-135m --temperature 0
      llama-cli chat --ckpt_dir checkpoints/smollm2-135m --output jsonl < questions.txt > replies.jsonl
      llama-cli chat --ckpt_dir llama-2-7b-chat --system "Answer in one sentence."

    Args:
      ckpt_dir: the checkpoint folder (consolidated.NN.pth + params.json + tokenizer).
      tokenizer_path: its tokenizer. Default is the one in ckpt_dir or its parent folder.
      system: a system message put before the conversation.
      chat_format: auto, llama2, llama3 or template. auto takes the checkpoint's chat template
        (tokenizer_config.json), else Meta's Llama 3 format for tiktoken tokenizers and Meta's Llama 2
        format for SentencePiece ones.
      temperature: sampling temperature; 0 is greedy.
      top_p: nucleus sampling threshold.
      top_k: sample from the k most likely tokens only (0 means no limit).
      min_p: drop tokens less than min_p times as likely as the most likely one (0 means off).
      repetition_penalty: HF's repetition penalty (1 means off).
      presence_penalty: OpenAI's presence penalty, -2 to 2.
      frequency_penalty: OpenAI's frequency penalty, -2 to 2.
      stop: end a reply where this text appears; repeat for several.
      max_seq_len: the longest conversation kept, in tokens (older exchanges are dropped beyond it).
      max_gen_len: the longest reply, in tokens.
      seed: random seed.
      output: text (each reply as it is, then a newline; a reply may span lines) or jsonl (each reply as one
        object on one line, with messages, generation, message, tokens and finish_reason, or error for a
        message too long for --max_seq_len). Piped, a message that did not fit makes the exit code 1 at the end.
      device: cpu, cuda, cuda:N or mps. Default is the GPU if there is one, else cpu.
      dtype: fp32, bf16 or fp16. Default is bf16 on GPUs, fp32 on cpu.
      kv_cache_dtype: auto (dtype's), fp32, bf16 or fp16: the KV cache's type. bf16 or fp16 under fp32 halves
        the cache's memory and speeds up long conversations on the CPU (keys and values rounded to it).
      quantize: int8 or int4, to quantize the linear layers' weights at load (weight-only; see llama-cli --help).
      group_size: weights per quantization group along the input dimension (see llama-cli --help).
      compile: on, off or auto, as for llama-cli (see llama-cli --help).
      cuda_graphs: on, off or auto (on CUDA GPUs), as for llama-cli.
      threads: CPU threads, 1 to the CPUs this process may use. Default is one per core (at most a container's
        CPU quota; fewer while other work keeps some cores busy), or OMP_NUM_THREADS.
    """
    from . import distributed
    from .cli import stdout_open
    from .generation import Llama
    from .prompts import ReaderEnds
    from .tokenizer import find_tokenizer

    settings, quantize, group_size = _checked(ckpt_dir, system, output, quantize, group_size, max_seq_len, {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repetition_penalty": repetition_penalty, "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty, "stop": stop or [], "max_gen_len": max_gen_len})
    rank = distributed.world()[1]
    if rank == 0:  # under torchrun rank 0 reads the messages and writes the replies; the others compute with it
        stdout_open("the replies")
    tokenizer_path = str(tokenizer_path or find_tokenizer(str(ckpt_dir)))
    llama = Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len, 1, seed=seed, device=device, dtype=dtype,
                        chat_format=chat_format, kv_cache_dtype=kv_cache_dtype, quantize=quantize,
                        group_size=group_size, compile=compile, cuda_graphs=cuda_graphs, threads=threads)
    llama.chat_format  # an unusable format is an error now, not at the first message
    interactive = distributed.broadcast_json(sys.stdin is not None and sys.stdin.isatty(), llama.device)
    if llama.model.mp.world_size == 1:
        out, err, stop = sys.stdout, sys.stderr, None  # a closed standard output (`| head`) ends the chat: exit 0
    elif rank == 0:  # it ends every rank's chat at the next message instead, the others told (shared_lines)
        out, err = ReaderEnds(sys.stdout), sys.stderr
        stop = out.closed_by_reader
    else:
        out, err, stop = open(os.devnull, "w"), open(os.devnull, "w"), None
    lines = distributed.shared_lines(text_lines(sys.stdin) if rank == 0 else (), llama.device, stop=stop)
    return converse(llama, settings, system, lines, out, err, interactive, output)


def _checked(ckpt_dir, system, output, quantize, group_size, max_seq_len, sampling: dict):
    """chat's flags checked before anything loads: (the reply settings, quantize, group_size) as it runs them."""
    from .quant import check_flags
    from .settings import Settings, resolve

    if ckpt_dir is None:
        raise UserError("--ckpt_dir is required: the checkpoint folder to chat with")
    if system is not None and not isinstance(system, str):
        raise UserError("--system takes a text")
    if system is not None:
        check_text(system, "--system")
    if output not in ("text", "jsonl"):
        raise UserError(f"--output must be text or jsonl, got {output!r}")
    quantize, group_size = check_flags(quantize, group_size)
    settings = resolve(Settings(), sampling)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"--max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    return settings, quantize, group_size


def text_lines(stream) -> Iterable[str]:
    """A stream's lines as text, read as UTF-8 whatever the locale says; bytes that are not UTF-8 come as lone
    surrogates (surrogateescape), which converse refuses (the tokenizer cannot take them)."""
    if stream is None:
        return
    for raw in getattr(stream, "buffer", stream):
        yield raw.decode("utf-8", errors="surrogateescape") if isinstance(raw, bytes) else raw


def converse(llama, settings, system: Optional[str], lines: Iterable[str], out: IO, err: IO,
             interactive: bool, output: str = "text") -> int:
    """The conversation loop (see the module docstring); returns the exit code: 1 when piped messages did not
    fit, else 0."""
    from .distributed import world
    from .prompts import PromptRequest, Result, json_line

    base = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    answered = too_long = 0
    # Ctrl-C stops a reply on a terminal; under torchrun each process would stop at a step of its own
    stoppable = interactive and world()[0] == 1
    if interactive:
        err.write(f"llama-cli chat with {llama.chat_format.name} format "
                  f"{HELP if stoppable else HELP.replace('Ctrl-C stops a reply, ', '')}\n> ")
        err.flush()
    for n, raw in enumerate(lines, 1):
        text = raw.rstrip("\r\n")
        try:
            check_text(text, f"standard input line {n}")
        except UserError:
            if not interactive:  # the replies before it stand; a script is told which line
                raise UserError(f"standard input line {n} is not UTF-8 text; send UTF-8") from None
            err.write("llama-cli: that line is not UTF-8 text (is the terminal set to UTF-8?); type it again\n> ")
            err.flush()  # the conversation so far is kept
            continue
        if interactive and text.strip() in ("/exit", "/quit"):
            break
        if interactive and text.strip() == "/reset":
            history = []
            err.write("(conversation reset)\n> ")
            err.flush()
            continue
        if not text.strip():
            if interactive:
                err.write("> ")
                err.flush()
            continue
        dialog = (history if interactive else []) + [{"role": "user", "content": text}]
        ids, dialog, problem = fit(llama, base, dialog, settings.max_gen_len, err)
        request = PromptRequest(answered, text, settings, messages=base + dialog)
        answered += 1
        if ids is None:
            too_long += 1
            out.write(json_line(Result(request, error=problem).record()) if output == "jsonl" else "\n")
            out.flush()
        else:
            reply, g = reply_to(llama, ids, settings, out if output == "text" else None, stoppable)
            if output == "jsonl":
                out.write(json_line(Result(request, reply, g.tokens, finish_reason=g.finish_reason).record()))
                out.flush()
            if g.finish_reason == "interrupted":
                err.write("(reply stopped)\n")
            if interactive:  # a reply stopped before its first word leaves the message out, as if never sent
                history = dialog + [{"role": "assistant", "content": reply}] if reply else dialog[:-1]
        if interactive:
            err.write("> ")
            err.flush()
    if interactive:
        err.write("\n")
        return 0
    if too_long:
        err.write(f"llama-cli: {too_long} of {answered} message(s) could not run"
                  f"{'; see their error entries' if output == 'jsonl' else ' (an empty reply each)'}\n")
    return 1 if too_long else 0


def fit(llama, base: list, dialog: list, max_gen_len: int, err: IO):
    """(prompt ids, dialog, None) for the newest turns that fit max_seq_len with room for a reply of up to
    min(max_gen_len, a quarter of it) tokens; older exchanges are dropped with a note. (None, dialog, the
    problem, also told on err) when the message alone does not fit."""
    room = min(max_gen_len, max(1, llama.max_seq_len // 4))
    dropped = 0
    while True:
        ids = llama.encode_dialog(base + dialog)
        if len(ids) + room <= llama.max_seq_len:
            break
        if len(dialog) <= 1:
            problem = (f"this message is {len(ids)} tokens, too long for --max_seq_len {llama.max_seq_len} with "
                       f"room to reply; shorten it or raise --max_seq_len")
            err.write(f"llama-cli: {problem}\n")
            return None, dialog, problem
        dialog = dialog[2:]  # the oldest user message and its reply
        dropped += 1
    if dropped:
        err.write(f"llama-cli: the conversation is full (--max_seq_len {llama.max_seq_len}); dropped the "
                  f"{dropped} oldest exchange(s)\n")
    return ids, dialog, None


def reply_to(llama, ids: list, settings, out: Optional[IO], stoppable: bool = False):
    """Generate the reply to prompt ids, streaming it to `out` (if given) with a newline after it; returns its
    text and its Generated. stoppable: Ctrl-C (KeyboardInterrupt) ends the reply where it is, with
    finish_reason "interrupted" and the text shown so far."""
    from .generation import Generated
    from .stopping import StopText

    if out is None and not stoppable:  # no per-step look needed: the loop reads tokens back less often on a GPU
        g = llama.generate_settings([ids], [settings])[0]
        return (llama.tokenizer.decode(g.tokens) if g.text is None else g.text), g

    watch = StopText(llama.tokenizer, settings.stop)
    state = {"ids": [], "shown": "", "done": False}

    def step(tokens):
        if state["done"]:
            return
        if tokens[0] in llama.tokenizer.stop_ids:
            state["done"] = True
            return
        state["ids"].append(tokens[0])
        state["done"] = watch.update(state["ids"])
        text = watch.safe_text()
        if text.startswith(state["shown"]) and len(text) > len(state["shown"]):
            if out is not None:
                out.write(text[len(state["shown"]):])
                out.flush()
            state["shown"] = text

    try:
        g = llama.generate_settings([ids], [settings], on_step=step)[0]
    except KeyboardInterrupt as e:
        if not stoppable or type(e) is not KeyboardInterrupt:  # SIGTERM (cli.Terminated) still ends the run
            raise
        g = Generated(state["ids"], None, "interrupted", state["shown"])
    text = g.text if g.text is not None else llama.tokenizer.decode(g.tokens)
    if out is not None:
        if text.startswith(state["shown"]):
            out.write(text[len(state["shown"]):])
        out.write("\n")
        out.flush()
    return text, g
