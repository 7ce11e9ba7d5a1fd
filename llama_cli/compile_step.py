"""`llama-cli compile`: compile a checkpoint's decoding step ahead of time, for later runs.

The compiled step is kept on disk (compiled.py), so later runs with `--compile auto` (the
default) start with it in a second or two instead of compiling or falling back to eager.
"""

from __future__ import annotations

import logging
import time

from .errors import UserError

log = logging.getLogger("llama_cli")


def compile_step(ckpt_dir=None, tokenizer_path=None, max_batch_size=1, max_seq_len=512, device=None, dtype=None,
                 kv_cache_dtype="auto", quantize=None, group_size=None, threads=None):
    """Compile the decoding step of a checkpoint now, so that later runs start with it.

    Example:
      llama-cli compile --ckpt_dir checkpoints/smollm2-135m

    On the CPU the compiled step serves batches of 1-2 prompts (--max_batch_size 1 or 2), where it
    streams the weights several times faster than eager PyTorch; bigger batches run eager. Where our CPU
    kernels are built (x86 CPUs) and the model runs in fp32 in one process, the uncompiled step (each
    layer one native call) is faster still, and --compile auto does not compile or use a compiled step
    (this command says so; --compile on does).

    The step is kept for one model form, KV cache and, on the CPU, thread count: compile with the
    --max_batch_size, --max_seq_len (rounded up to 64), --dtype, --kv_cache_dtype, --quantize, --group_size and
    --threads that the runs will use (their defaults are the same as a run's).

    Args:
      ckpt_dir: the checkpoint folder (consolidated.NN.pth + params.json).
      tokenizer_path: its tokenizer. Default is the one in ckpt_dir or its parent folder.
      max_batch_size: the largest batch the step is compiled for (1 or 2 on the CPU).
      max_seq_len: the --max_seq_len of the runs that will use it (default 512, as a run's).
      device: cpu, cuda, cuda:N or mps. Default is this rank's GPU if there is one, else cpu.
      dtype: fp32, bf16 or fp16, as you will run it. Default is bf16 on GPUs, fp32 on cpu.
      kv_cache_dtype: auto, fp32, bf16 or fp16, as you will run it (auto: as --dtype).
      quantize: int8 or int4, where the runs quantize the weights as they load (a folder written by
        llama-cli quantize needs none).
      group_size: with --quantize, as the runs give it.
      threads: CPU threads, as you will run it (the compiled CPU step is made for its thread count). Default is
        one per core (at most a container's CPU quota), or OMP_NUM_THREADS.
    """
    import torch

    from . import compiled
    from .cpu_step import NativeStep
    from .generation import Llama
    from .parallel import GEMV_MAX_ROWS
    from .tokenizer import find_tokenizer

    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UserError(f"--max_batch_size must be a positive integer, got {max_batch_size!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"--max_seq_len must be an integer of at least 2, got {max_seq_len!r}")
    if ckpt_dir is None:
        raise UserError("--ckpt_dir is required: the checkpoint folder whose decoding step to compile")
    why = compiled.compile_room_problem()
    if why is not None:
        raise UserError(f"cannot compile: {why}; make room there, or set LLAMA_CLI_CACHE to another folder")
    tokenizer_path = tokenizer_path or find_tokenizer(str(ckpt_dir))
    start = time.perf_counter()
    llama = Llama.build(str(ckpt_dir), str(tokenizer_path), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype, compile="on", cuda_graphs="off", threads=threads,
                        kv_cache_dtype=kv_cache_dtype, quantize=quantize, group_size=group_size)
    if NativeStep.replaces_compiling(llama.model):
        log.warning("on this machine %s decodes faster uncompiled (each layer one native call, with our CPU kernels): "
                    "--compile auto will not use this compiled step; --compile on does", ckpt_dir)
    rows = range(1, min(max_batch_size, GEMV_MAX_ROWS) + 1) if llama.device.type == "cpu" else [max_batch_size]
    for n in rows:
        llama.generate([[1, 2, 3]] * n, max_gen_len=3, temperature=0)
    on = f" on {torch.get_num_threads()} thread(s)" if llama.device.type == "cpu" else ""
    log.info("compiled the decoding step of %s for %s row(s)%s in %.1f s; later runs%s use it", ckpt_dir,
             "/".join(map(str, rows)), on, time.perf_counter() - start, " with as many" if on else "")
    return 0
