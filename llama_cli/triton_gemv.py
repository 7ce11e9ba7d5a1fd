"""Triton kernels for the weight-only int4 and int8 products of one or two rows on GPUs: the CUDA default for
decode steps of 1-2 rows (quant.cuda_forms). Measured on an H100 at the Llama-2-7B shape, batch 1, in a captured
CUDA graph without compiling (docs/benchmarks.md, fifteenth session): int4 groups of 32 346 tok/s and of 128
427 (PyTorch's tinygemm kernel, third session's call: 206), int8 per row 248 (its multiply-and-sum, only fast
compiled: 234-252).
The first call of each weight shape times a few configurations (Triton's autotuner, seconds).

int4 keeps our form (quant.py): q (out, in/2) bytes, in each group of g columns byte j holding column j in its
low nibble and column j + g/2 in its high one; w = v * scale + offset, tables (out, groups). Each program
computes BLOCK_N outputs of one row, GROUP_BYTES of each weight row (whole groups) at a time:
y_o = sum_groups scale_og * (sum_j lo_j x_j + hi_j x_{j+g/2}) + offset_og * (sum of x over the group).
int8 per row: q (out, in) int8, w = q * scale, scale (out, 1); BLOCK_K bytes of each weight row at a time.
Sums in fp32. With TRITON_INTERPRET=1 they run on the CPU (numpy), which is how the tests check them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs): quant.py never picks this form
    triton = None


def available() -> bool:
    return triton is not None


# Every launch of our kernels (these and triton_step's) asks for fused multiply-adds, as they were measured:
# Triton <= 3.9 fuses by default, but warns that 3.10 will not (a multiply and an add apiece, slower) unless asked.
FP_FUSION = {"enable_fp_fusion": True}


def fits_device(device: torch.device) -> bool:
    """Whether our kernels are the default on `device` (quant.cuda_forms): NVIDIA GPUs of compute capability
    8.0 or more (sm_80 compiled in the tests, sm_90 timed); others keep the library kernels. A device that is
    not a GPU (the tests' CPU tensors, run by Triton's interpreter) fits."""
    from .devices import is_cuda

    if not is_cuda(device):
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


# (outputs a program computes, bytes of each weight row it reads per iteration, warps, pipeline stages, how x
# reaches the threads): the configurations timed on the first call for each weight shape (on a GPU; untimed
# yet, so several), the first of them alone under the interpreter. x: 0, loaded once per program and handed to
# the threads that need it through shared memory (a barrier or more an iteration); 1, each thread loads the
# part of x its own weights meet, shaped as they are (no barrier; every row of the tile loads it again, from
# the cache, and int4 sums its groups again). Which wins on a GPU is for the autotuner to find (the PTX does
# not tell). The H100's product table (fifteenth session, docs/gpu-runs/2026-11-28-call2.log) favoured few
# outputs and many bytes a program, most at the 4096-output shapes (attention's output, w2), where int8 ran at
# 1.3-1.7 TB/s against 1.9-2.2 for the wide ones: the last entries go further that way.
INT4_CONFIGS = ((16, 256, 4, 3, 0), (8, 512, 4, 3, 0), (4, 1024, 4, 2, 0), (16, 1024, 8, 2, 0),
                (16, 256, 4, 3, 1), (4, 1024, 4, 2, 1), (8, 1024, 4, 2, 1), (2, 2048, 4, 2, 1),
                (4, 2048, 4, 2, 0), (2, 2048, 4, 2, 0))
INT8_CONFIGS = ((16, 256, 4, 3, 0), (8, 512, 4, 3, 0), (4, 1024, 4, 3, 0), (16, 1024, 8, 2, 0),
                (16, 256, 4, 3, 1), (4, 1024, 4, 3, 1), (8, 1024, 4, 2, 1), (4, 2048, 4, 2, 1),
                (4, 2048, 4, 3, 0), (2, 2048, 4, 3, 0), (8, 1024, 4, 3, 0))


def _config(entry, bytes_name: str):
    n, b, w, st, x_tile = entry
    return triton.Config({"BLOCK_N": n, bytes_name: b, "X_TILE": x_tile}, num_warps=w, num_stages=st)


def _configs(table, bytes_name: str) -> list:
    """A table's configurations as Triton's, its second column named bytes_name (the first alone interpreted)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [_config(e, bytes_name) for e in table[:1 if interpreted else None]]


if triton is not None:
    @triton.jit
    def _small_int_to_float(v, minus: tl.constexpr = 0.0):
        """Integers 0 <= v < 2^23 as fp32, less `minus`, exactly: v's bits under the exponent of 2^23, less
        2^23 + minus. A logic op and an add, where a conversion instruction runs 16 a clock per SM on sm_80 and
        sm_90 (CUDA's throughput table), against 64-128 for those; two per int4 weight byte would bound the
        kernel near 2 TB/s on an H100."""
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + minus)

    @triton.autotune(configs=_configs(INT4_CONFIGS, "GROUP_BYTES"), key=["N", "K", "HALF"])
    @triton.jit
    def _int4_rows(x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, N, K, QROW, GROUPS,
                   HALF: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_BYTES: tl.constexpr, X_TILE: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs
        row = tl.program_id(1)
        nmask = n < N
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_N, GROUP_BYTES // HALF), dtype=tl.float32)  # summed across threads once, at the end
        x_row = x_ptr + row * K
        for k0 in range(0, GROUPS, GROUP_BYTES // HALF):  # GROUP_BYTES // HALF groups an iteration
            g = k0 + tl.arange(0, GROUP_BYTES // HALF)
            gmask = g < GROUPS
            qb = tl.load(q_ptr + n[:, None, None] * QROW + g[None, :, None] * HALF + j[None, None, :],
                         mask=nmask[:, None, None] & gmask[None, :, None], other=0)  # (BLOCK_N, groups, HALF)
            qb = qb.to(tl.int32)
            if X_TILE:  # x's two halves of each group as (BLOCK_N, groups, HALF), see INT4_CONFIGS
                xp = x_row + g[None, :, None] * (2 * HALF) + j[None, None, :] + 0 * n[:, None, None]
                xlo = tl.load(xp, mask=gmask[None, :, None], other=0.0).to(tl.float32)
                xhi = tl.load(xp + HALF, mask=gmask[None, :, None], other=0.0).to(tl.float32)
                xsum = tl.sum(xlo + xhi, axis=2)  # (BLOCK_N, groups)
            else:  # as (groups, HALF), once
                xp = x_row + g[:, None] * (2 * HALF) + j[None, :]
                xlo = tl.load(xp, mask=gmask[:, None], other=0.0).to(tl.float32)
                xhi = tl.load(xp + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
                xsum = tl.sum(xlo + xhi, axis=1)[None, :]
                xlo, xhi = xlo[None, :, :], xhi[None, :, :]
            lo, hi = _small_int_to_float(qb & 15), _small_int_to_float(qb >> 4)
            t = tl.sum(lo * xlo + hi * xhi, axis=2)  # (BLOCK_N, groups)
            tmask = nmask[:, None] & gmask[None, :]
            s = tl.load(s_ptr + n[:, None] * GROUPS + g[None, :], mask=tmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + n[:, None] * GROUPS + g[None, :], mask=tmask, other=0.0).to(tl.float32)
            acc += t * s + m * xsum
        acc = tl.sum(acc, axis=1)
        tl.store(y_ptr + row * N + n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def _launch(kernel, config, grid_n: int, rows: int, *args, **kw) -> None:
    """The autotuned kernel, or with config (a table entry's triton.Config) that configuration alone."""
    if config is None:
        kernel[lambda meta: (triton.cdiv(grid_n, meta["BLOCK_N"]), rows)](*args, **kw, **FP_FUSION)
    else:
        kernel.fn[(triton.cdiv(grid_n, config.kwargs["BLOCK_N"]), rows)](
            *args, **kw, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, **FP_FUSION)


def int4_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, config=None) -> torch.Tensor:
    """x (rows, in) @ W.T for W in our int4 form (groups of a power of two, at least 32 columns): (rows, out) in
    x's dtype. Meant for one or two rows (each row reads the weight once). config: one of INT4_CONFIGS as
    _config makes it, instead of the autotuned choice (the tests)."""
    rows, k = x.shape
    n, groups = scale.shape
    half = k // groups // 2
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    # q's row length in bytes passed on its own: Triton specializes integer arguments divisible by 16, so
    # it knows each weight row starts 16-byte aligned and loads 16 bytes at a time (from K // 2 it would
    # know 8, and loaded 8: the PTX compiled for sm_90, tests/test_quant.py)
    _launch(_int4_rows, config, n, rows, x.contiguous(), q, scale, offset, y, n, k, q.stride(0), groups, HALF=half)
    return y


if triton is not None:
    @triton.autotune(configs=_configs(INT8_CONFIGS, "BLOCK_K"), key=["N", "K"])
    @triton.jit
    def _int8_rows(x_ptr, q_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   X_TILE: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.program_id(1)
        nmask = n < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed across threads once, at the end
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            w = tl.load(q_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            if X_TILE:  # x as (BLOCK_N, BLOCK_K), see INT4_CONFIGS
                x = tl.load(x_ptr + row * K + k[None, :] + 0 * n[:, None], mask=kmask[None, :], other=0.0)
            else:
                x = tl.load(x_ptr + row * K + k, mask=kmask, other=0.0)[None, :]
            x = x.to(tl.float32)
            acc += _small_int_to_float(w.to(tl.int32) + 128, 128.0) * x
        acc = tl.sum(acc, axis=1)
        s = tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + n, (acc * s).to(y_ptr.dtype.element_ty), mask=nmask)


def int8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, config=None) -> torch.Tensor:
    """x (rows, in) @ W.T for W int8 with one scale per output row: (rows, out) in x's dtype (config: as
    int4_rows')."""
    rows, k = x.shape
    n = q.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _launch(_int8_rows, config, n, rows, x.contiguous(), q, scale, y, n, k)
    return y


def best_configs() -> dict:
    """The configuration timed best for each kernel and weight shape so far: {"int4 (N, K, HALF)": "..."}."""
    if triton is None:
        return {}
    return {f"{name} {key[:3 if name == 'int4' else 2]}": str(cfg)
            for name, kernel in (("int4", _int4_rows), ("int8", _int8_rows))
            for key, cfg in getattr(kernel, "cache", {}).items()}
