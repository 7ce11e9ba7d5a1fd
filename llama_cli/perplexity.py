"""`llama-cli perplexity`: how well a model predicts a text (the quality meter, like llama.cpp's
llama-perplexity), on any device and process count.

The text is tokenized once (with BOS where the tokenizer adds one) and scored in windows of --ctx
tokens that start every --stride tokens; each window scores only the tokens the previous one did
not (the sliding-window recipe of HF transformers' perplexity guide), so with stride = ctx the
windows are disjoint and with a smaller stride every token but the first window's gets more
context. Perplexity = exp(mean negative log-likelihood over every scored token).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from .errors import UserError

log = logging.getLogger("llama_cli")


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n_tokens tokens."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no prediction inside the window
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def score(llama, ids: list[int], ctx: int, stride: int, batch: int, progress=None) -> tuple[float, int]:
    """(sum of negative log-likelihoods, number of scored tokens) of `ids`."""
    import torch
    import torch.nn.functional as F

    spans = windows(len(ids), ctx, stride)
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch):
        part = spans[i:i + batch]
        per_row = llama.engine.prefill(range(len(part)), [ids[b:e] for b, e, _ in part], all_logits=True)
        for (b, e, first), logits in zip(part, per_row):
            targets = torch.as_tensor(ids[first:e], device=logits.device)
            preds = logits[first - b - 1:e - b - 1]  # position p predicts token p + 1
            nll += F.cross_entropy(preds.float(), targets, reduction="sum").item()
            count += e - first
        if progress is not None:
            progress(min(i + batch, len(spans)), len(spans), nll, count)
    return nll, count


def read_text(text_file: str) -> str:
    if not os.path.exists(text_file):  # (a pipe, a shell's <(command), reads as a file does)
        raise UserError(f"--text_file {text_file} does not exist")
    if os.path.isdir(text_file):
        raise UserError(f"--text_file {text_file} is a folder; give a text file")
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{text_file} is not UTF-8 text; save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{text_file} is empty")
    return text


def text_ids(tokenizer, text: str, text_file) -> list[int]:
    ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)
    if len(ids) < 2:
        raise UserError(f"{text_file} holds fewer than 2 tokens; nothing to predict")
    return ids


def perplexity(ckpt_dir=None, text_file=None, tokenizer_path=None, ctx=512, stride=None, max_batch_size=4,
               output="text", device=None, dtype=None, kv_cache_dtype="auto", quantize=None, group_size=None,
               quiet=False, threads=None):
    """Perplexity of a model on a text file: the last line on stdout is "perplexity: X.XXXX".

    Examples:
      llama-cli perplexity --ckpt_dir checkpoints/smollm2-135m --text_file book.txt
      llama-cli perplexity --ckpt_dir llama-2-7b --text_file book.txt --ctx 1024 --stride 512 --output jsonl

    Args:
      ckpt_dir: the checkpoint folder (consolidated.NN.pth + params.json + tokenizer).
      text_file: a UTF-8 text file to score.
      tokenizer_path: its tokenizer. Default is the one in ckpt_dir or its parent folder.
      ctx: tokens per window (the context each prediction can see at most).
      stride: a new window starts every stride tokens; each scores only tokens the previous did not.
        Default is ctx (disjoint windows, like llama.cpp); smaller is slower and gives more context.
      max_batch_size: windows scored together (in one process, at most as many as the text has).
      output: text (the perplexity line) or jsonl (one object with perplexity, nll, tokens, windows).
      device: cpu, cuda, cuda:N or mps. Default is this rank's GPU if there is one, else cpu.
      dtype: fp32, bf16 or fp16. Default is bf16 on GPUs, fp32 on cpu.
      kv_cache_dtype: auto (dtype's), fp32, bf16 or fp16: the KV cache's type; bf16 or fp16 under fp32 halve its
        memory (rows x ctx positions). The scores are the same: a window attends over its own keys and values.
      quantize: int8 or int4, to quantize the linear layers' weights at load and score the model so (weight-only;
        see llama-cli --help): the loss quantizing costs, without writing a quantized copy.
      group_size: weights per quantization group along the input dimension (see llama-cli --help).
      quiet: no progress on stderr.
      threads: CPU threads, 1 to the CPUs this process may use. Default is one per core (at most a container's
        CPU quota; fewer while other work keeps some cores busy), or OMP_NUM_THREADS.
    """
    from . import distributed
    from .generation import Llama
    from .tokenizer import find_tokenizer, load_tokenizer

    stride, quantize, group_size = _checked(ckpt_dir, text_file, ctx, stride, max_batch_size, output, quantize,
                                            group_size)
    world_size, rank, _ = distributed.world()
    if rank == 0:
        from .cli import stdout_open

        stdout_open("the perplexity")
    text = read_text(str(text_file)) if rank == 0 else None
    tokenizer_path = str(tokenizer_path or find_tokenizer(str(ckpt_dir)))
    ids, rows, positions, tokenizer = None, max_batch_size, ctx, None
    if world_size == 1:  # the text known before the model: a KV cache for as many windows as it has, at most,
        tokenizer = load_tokenizer(tokenizer_path)  # and as many positions as the longest window
        ids = text_ids(tokenizer, text, text_file)
        rows, positions = min(max_batch_size, len(windows(len(ids), ctx, stride))), min(ctx, len(ids))
    try:
        llama = Llama.build(str(ckpt_dir), tokenizer_path, positions, rows, device=device, dtype=dtype,
                            compile="off", cuda_graphs="off", tokenizer=tokenizer, kv_cache_dtype=kv_cache_dtype,
                            expected_tokens=0,  # prefills only
                            quantize=quantize, group_size=group_size, threads=threads)
    except UserError as e:  # the memory check names the generating command's flag for the context
        raise UserError(str(e).replace("--max_seq_len", "--ctx").replace("max_seq_len=", "ctx=")) from None
    if ids is None:  # under torchrun only rank 0 has read it
        ids = text_ids(llama.tokenizer, distributed.broadcast_json(text, llama.device), text_file)
    start = time.perf_counter()
    show = rank == 0 and not quiet

    def progress(done, total, nll, count):
        if show:
            print(f"llama-cli: {done}/{total} windows, {count} tokens, perplexity so far "
                  f"{math.exp(nll / count):.4f}, {count / (time.perf_counter() - start):.0f} tokens/s",
                  file=sys.stderr, flush=True)

    nll, count = score(llama, ids, ctx, stride, max_batch_size, progress)
    ppl = math.exp(nll / count)
    if rank == 0:
        if output == "jsonl":
            print(json.dumps({"perplexity": ppl, "nll": nll / count, "tokens": count, "text_tokens": len(ids),
                              "ctx": ctx, "stride": stride, "windows": len(windows(len(ids), ctx, stride))}))
        else:
            print(f"perplexity: {ppl:.4f}")
    return 0


def _checked(ckpt_dir, text_file, ctx, stride, max_batch_size, output, quantize, group_size):
    """perplexity's flags checked before anything is read: (stride, quantize, group_size) as it runs them."""
    from . import checkpoint
    from .quant import check_flags

    if ckpt_dir is None or text_file is None:
        raise UserError("perplexity needs --ckpt_dir (the model) and --text_file (the text to score)")
    given = (("stride", stride),) if stride is not None else ()  # 0 is refused, not taken for the default
    for name, value in (("ctx", ctx), ("max_batch_size", max_batch_size)) + given:
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "ctx" else 1):
            raise UserError(f"--{name} must be an integer >= {2 if name == 'ctx' else 1}, got {value!r}")
    stride = ctx if stride is None else stride
    if stride > ctx:
        raise UserError(f"--stride {stride} is larger than --ctx {ctx}: tokens between windows would be skipped")
    if output not in ("text", "jsonl"):
        raise UserError(f"--output must be text or jsonl, got {output!r}")
    quantize, group_size = check_flags(quantize, group_size)  # before the text is read
    checkpoint.find_checkpoint(str(ckpt_dir))  # a GGUF file, an HF folder: said first, as runs do
    return stride, quantize, group_size
