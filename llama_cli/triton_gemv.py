"""Triton kernels for the weight-only int4 and int8 products of one or two rows on GPUs: candidates to what
runs there now (scripts/gpu_check.py times them beside it). int4 goes through PyTorch's tinygemm kernel
(quant.kernel_form), which at one row streamed the 7B shape's int4 weights at ~1.16 TB/s on an H100 where bf16
weights stream at ~2.5 (docs/benchmarks.md); int8 through a multiply-and-sum that only a compiled step makes
fast (~1.7 TB/s). Both kernels run inside a captured CUDA graph without compiling. Used where quant.CUDA_INT4
or quant.CUDA_INT8 is "triton".

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


# (outputs a program computes, bytes of each weight row it reads per iteration, warps, pipeline stages): the
# configurations timed on the first call for each weight shape (on a GPU; untimed yet, so several), the first
# of them alone under the interpreter
INT4_CONFIGS = ((16, 256, 4, 3), (8, 256, 2, 3), (8, 512, 4, 3), (16, 512, 4, 2), (32, 256, 4, 3), (4, 1024, 4, 2),
                (8, 1024, 4, 2), (16, 1024, 8, 2), (2, 2048, 4, 2))
INT8_CONFIGS = ((16, 256, 4, 3), (8, 512, 4, 3), (16, 512, 4, 2), (32, 256, 4, 3), (4, 1024, 4, 3), (8, 1024, 4, 2),
                (16, 1024, 8, 2), (4, 2048, 4, 2))


def _configs(table, bytes_name: str) -> list:
    """A table's configurations as Triton's, its second column named bytes_name (the first alone interpreted)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [triton.Config({"BLOCK_N": n, bytes_name: b}, num_warps=w, num_stages=st)
            for n, b, w, st in table[:1 if interpreted else None]]


if triton is not None:
    @triton.autotune(configs=_configs(INT4_CONFIGS, "GROUP_BYTES"), key=["N", "K", "HALF"])
    @triton.jit
    def _int4_rows(x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, N, K, QROW, GROUPS,
                   HALF: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_BYTES: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs
        row = tl.program_id(1)
        nmask = n < N
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_row = x_ptr + row * K
        for k0 in range(0, GROUPS, GROUP_BYTES // HALF):  # GROUP_BYTES // HALF groups an iteration
            g = k0 + tl.arange(0, GROUP_BYTES // HALF)
            gmask = g < GROUPS
            qb = tl.load(q_ptr + n[:, None, None] * QROW + g[None, :, None] * HALF + j[None, None, :],
                         mask=nmask[:, None, None] & gmask[None, :, None], other=0)  # (BLOCK_N, groups, HALF)
            xlo = tl.load(x_row + g[:, None] * (2 * HALF) + j[None, :], mask=gmask[:, None], other=0.0)
            xhi = tl.load(x_row + g[:, None] * (2 * HALF) + HALF + j[None, :], mask=gmask[:, None], other=0.0)
            xlo, xhi = xlo.to(tl.float32), xhi.to(tl.float32)
            t = tl.sum((qb & 15).to(tl.float32) * xlo[None, :, :] + (qb >> 4).to(tl.float32) * xhi[None, :, :],
                       axis=2)  # (BLOCK_N, groups)
            tmask = nmask[:, None] & gmask[None, :]
            s = tl.load(s_ptr + n[:, None] * GROUPS + g[None, :], mask=tmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + n[:, None] * GROUPS + g[None, :], mask=tmask, other=0.0).to(tl.float32)
            acc += tl.sum(t * s + m * tl.sum(xlo + xhi, axis=1)[None, :], axis=1)
        tl.store(y_ptr + row * N + n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def int4_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ W.T for W in our int4 form (groups of a power of two, at least 32 columns): (rows, out) in
    x's dtype. Meant for one or two rows (each row reads the weight once)."""
    rows, k = x.shape
    n, groups = scale.shape
    half = k // groups // 2
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    # q's row length in bytes passed on its own: Triton specializes integer arguments divisible by 16, so
    # it knows each weight row starts 16-byte aligned and loads 16 bytes at a time (from K // 2 it would
    # know 8, and loaded 8: the PTX compiled for sm_90, tests/test_quant.py)
    _int4_rows[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), rows)](x.contiguous(), q, scale, offset, y, n, k,
                                                                     q.stride(0), groups, HALF=half)
    return y


if triton is not None:
    @triton.autotune(configs=_configs(INT8_CONFIGS, "BLOCK_K"), key=["N", "K"])
    @triton.jit
    def _int8_rows(x_ptr, q_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.program_id(1)
        nmask = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            w = tl.load(q_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            x = tl.load(x_ptr + row * K + k, mask=kmask, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        s = tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + n, (acc * s).to(y_ptr.dtype.element_ty), mask=nmask)


def int8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ W.T for W int8 with one scale per output row: (rows, out) in x's dtype."""
    rows, k = x.shape
    n = q.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _int8_rows[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), rows)](x.contiguous(), q, scale, y, n, k)
    return y


def best_configs() -> dict:
    """The configuration timed best for each kernel and weight shape so far: {"int4 (N, K, HALF)": "..."}."""
    if triton is None:
        return {}
    return {f"{name} {key[:3 if name == 'int4' else 2]}": str(cfg)
            for name, kernel in (("int4", _int4_rows), ("int8", _int8_rows))
            for key, cfg in getattr(kernel, "cache", {}).items()}
