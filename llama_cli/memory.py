"""Memory pre-flight: estimate what a rank will allocate and compare it with what is free."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .errors import UserError
from .model import ModelArgs

GiB = 1024 ** 3


def weight_bytes(args: ModelArgs, world_size: int, dtype: torch.dtype,
                 linear_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one rank's weights (the output layer counted even when tied: it is the bound); linear_dtype:
    the linear layers' weights are kept in it (as stored) rather than in dtype."""
    from .checkpoint import is_linear, weight_table

    kv_heads = max(1, args.n_kv_heads // world_size)
    elt = torch.finfo(dtype).bits // 8
    linear_elt = torch.finfo(linear_dtype or dtype).bits // 8
    q = args.quantization
    total = 0
    for name, (shape, dim) in weight_table(args).items():
        n = math.prod(shape)
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            n = kv_heads * args.head_dim * args.dim  # with more ranks than KV heads, a head is repeated
        elif dim is not None:
            n //= world_size
        form = None
        if q is not None and is_linear(name):
            form = q
        elif q is not None and name == "tok_embeddings.weight":
            form = q.get("embeddings")
        if form is not None:  # stored quantized: 1 or 1/2 byte a weight + fp32 group tables
            groups = shape[1] // form["group_size"] if form["group_size"] else 1
            total += n // (2 if form["mode"] == "int4" else 1) + n * groups // shape[1] * 4 * 2
        else:
            total += n * (linear_elt if is_linear(name) else elt)
    return total


def kv_cache_bytes(args: ModelArgs, world_size: int, max_batch_size: int, max_seq_len: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one rank's static KV cache."""
    kv_heads = max(1, args.n_kv_heads // world_size)
    elt = torch.finfo(dtype).bits // 8
    return 2 * args.n_layers * max_batch_size * max_seq_len * kv_heads * args.head_dim * elt


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on the device (host memory for CPU), or None when it cannot be told."""
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        if hasattr(module, "mem_get_info"):
            return module.mem_get_info(device)[0]
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def preflight(args: ModelArgs, world_size: int, device: torch.device, dtype: torch.dtype,
              max_batch_size: int, max_seq_len: int, free: Optional[int] = None,
              linear_dtype: Optional[torch.dtype] = None, stored_half: Optional[torch.dtype] = None,
              kv_dtype: Optional[torch.dtype] = None) -> None:
    """Raise UserError, with the numbers and what to lower, when this rank would not fit. stored_half: the
    half-width dtype the linear weights are stored in, where an explicit --dtype fp32 widens them on the CPU
    (the message then says what leaving --dtype at its default would need)."""
    free = free_bytes(device) if free is None else free
    if free is None:
        return
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    weights = weight_bytes(args, world_size, dtype, linear_dtype)
    kv_dtype = kv_dtype or dtype
    kv = kv_cache_bytes(args, world_size, max_batch_size, max_seq_len, kv_dtype)
    need = (weights + kv) * sharing
    if need <= free:
        return
    where = f"{device}" + (f" for {sharing} processes" if sharing > 1 else "")
    if weights * sharing > free:
        what = ("load them quantized (--quantize int8, or int4: a quarter or an eighth of fp32's bytes), or spread "
                "them over more machines (torchrun --nnodes N)" if device.type == "cpu" else
                "use more GPUs (torchrun --nproc_per_node N), a smaller --dtype or --quantize int8|int4")
        if stored_half is not None:
            kept = weight_bytes(args, world_size, dtype, stored_half)
            what = (f"leave out --dtype fp32 to keep the linear weights in {str(stored_half)[6:]} as stored "
                    f"({kept / GiB:.2f} GiB), or {what}")
        raise UserError(
            f"the weights need {weights / GiB:.2f} GiB per process but only {free / GiB:.2f} GiB is free on {where}; "
            f"{what}")
    per_row = kv / max_batch_size
    fits = int((free / sharing - weights) // per_row)
    hint = (f"--max_batch_size {fits}" if fits >= 1 else
            f"--max_seq_len {int((free / sharing - weights) // (per_row / max_seq_len))}")
    # one row (one prompt, or chat, which has no --max_batch_size): its length is all there is to lower
    size, lower = ((f"max_batch_size={max_batch_size} x max_seq_len={max_seq_len}", "--max_batch_size or --max_seq_len")
                   if max_batch_size > 1 else (f"one row of max_seq_len={max_seq_len}", "--max_seq_len"))
    raise UserError(
        f"the KV cache needs {kv / GiB:.2f} GiB ({size}) on top of {weights / GiB:.2f} GiB of weights per process, "
        f"but only {free / GiB:.2f} GiB is free on {where}; lower {lower} (e.g. {hint})"
        + (", or hold it in half the bytes (--kv_cache_dtype bf16)" if kv_dtype == torch.float32 else ""))
