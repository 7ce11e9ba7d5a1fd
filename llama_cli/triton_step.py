"""Triton kernels for the small operations of the eager decode step on GPUs, which CUDA graphs replay: a
candidate, off by default (model.FUSED_SMALL_OPS; scripts/gpu_check.py times it beside the plain step). On an
H100 at the Llama-2-7B shape one eager batch-1 step launched 650 kernels, 6.21 ms of GPU time, ~1.2 ms of it in
~520 kernels other than the products (docs/benchmarks.md, fifteenth session): each norm was two kernels (the
norm, its weight), the residual add one more, the rotary embedding three (a widening copy, a complex product, a
narrowing copy), the gated unit two, each cache write one. Here each of those is one kernel (rotary_cache: the
rotary embedding and both cache writes), ~8 fewer a layer:

- rms_norm(x, w, eps): Meta's RMSNorm, normalised in fp32, rounded to x's type, then scaled by w (rounded);
- add_rms_norm(x, r, w, eps): h = x + r (rounded) and rms_norm(h, w, eps), one pass;
- silu_mul(gu): silu(gate) * up for w1 and w3 stacked (gu = [gate | up] along the last dimension);
- rotary(x, cos, sin): interleaved pairs rotated in fp32, rounded to x's type (x may be a strided view);
- rotary_cache(qkv, ...): a decode step's q and k rotated and k and v written to the KV cache, one kernel
  where rotary and the two cache writes were three (the writes ~4 us each on an H100, 0.25 ms a token).

Each rounds where the plain operations round, so results agree up to the order of a sum (the norm's). With
TRITON_INTERPRET=1 they run on the CPU (tests/triton_step_worker.py checks them against the plain operations).
"""

from __future__ import annotations

import os

import torch

from .triton_gemv import FP_FUSION

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs)
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use(x: torch.Tensor) -> bool:
    """Whether these kernels can run the eager step's small operations on `x` (a compiled step fuses its own)."""
    return triton is not None and (x.is_cuda or INTERPRETED) and not torch.compiler.is_compiling()


if triton is not None:
    @triton.jit
    def _norm_row(h, w_ptr, cols, mask, n_cols, eps, out_ty: tl.constexpr):
        """One row's RMSNorm: h (fp32, already rounded to the activations' type) -> rounded, times w, rounded."""
        ms = tl.sum(h * h, axis=0) / n_cols
        normed = (h * tl.rsqrt(ms + eps)).to(out_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        return (normed * w).to(out_ty)

    @triton.jit
    def _rms_norm(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = _norm_row(h, w_ptr, cols, mask, n_cols, eps, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * n_cols + cols, y, mask=mask)

    @triton.jit
    def _add_rms_norm(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
        y = _norm_row(h.to(tl.float32), w_ptr, cols, mask, n_cols, eps, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * n_cols + cols, y, mask=mask)

    @triton.jit
    def _silu_mul(gu_ptr, y_ptr, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        g = tl.load(gu_ptr + row * 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * hidden + hidden + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as F.silu's
        tl.store(y_ptr + row * hidden + cols, (s * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_pairs(base, i, mask):
        """Interleaved pairs (x[2i], x[2i+1]) from `base`, in fp32."""
        x0 = tl.load(base + 2 * i, mask=mask, other=0.0).to(tl.float32)
        return x0, tl.load(base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rotate(x0, x1, c_ptr, s_ptr, tok, half, i, mask):
        """Pairs turned by token `tok`'s angles (cos and sin (tokens, half), fp32)."""
        c = tl.load(c_ptr + tok * half + i, mask=mask, other=0.0)
        s = tl.load(s_ptr + tok * half + i, mask=mask, other=0.0)
        return x0 * c - x1 * s, x0 * s + x1 * c

    @triton.jit
    def _store_pairs(ptr, i, mask, a, b):
        """Pairs stored interleaved at `ptr`, rounded to its type."""
        ty = ptr.dtype.element_ty
        tl.store(ptr + 2 * i, a.to(ty), mask=mask)
        tl.store(ptr + 2 * i + 1, b.to(ty), mask=mask)

    @triton.jit
    def _rotary(x_ptr, c_ptr, s_ptr, y_ptr, x_token, x_head, heads, half, BLOCK: tl.constexpr):
        tok = tl.program_id(0)  # (batch row, position) flattened
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        mask = i < half
        x0, x1 = _load_pairs(x_ptr + tok * x_token + head * x_head, i, mask)
        r0, r1 = _rotate(x0, x1, c_ptr, s_ptr, tok, half, i, mask)
        _store_pairs(y_ptr + (tok * heads + head) * 2 * half, i, mask, r0, r1)

    @triton.jit
    def _rotary_cache(x_ptr, c_ptr, s_ptr, y_ptr, ck_ptr, cv_ptr, rows_ptr, pos_ptr, x_token, x_head, seqlen, hq,
                      hkv, half, c_row, c_head, BLOCK: tl.constexpr):
        """A decode step's q, k, v heads side by side (x: one token's row of the stacked product): q and k
        rotated into y, and k (rotated) and v written to the KV cache at (row, head, position)."""
        tok = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        i = tl.arange(0, BLOCK)
        mask = i < half
        x0, x1 = _load_pairs(x_ptr + tok * x_token + head * x_head, i, mask)
        row = tl.load(rows_ptr + tok // seqlen)
        pos = tl.load(pos_ptr + tok)
        if head < hq + hkv:
            r0, r1 = _rotate(x0, x1, c_ptr, s_ptr, tok, half, i, mask)
            _store_pairs(y_ptr + (tok * (hq + hkv) + head) * 2 * half, i, mask, r0, r1)
            if head >= hq:  # a key: into the cache, rounded as the activations are, then to the cache's type
                ty = y_ptr.dtype.element_ty
                _store_pairs(ck_ptr + row * c_row + (head - hq) * c_head + pos * 2 * half, i, mask, r0.to(ty),
                             r1.to(ty))
        else:  # a value: into the cache as it is
            _store_pairs(cv_ptr + row * c_row + (head - hq - hkv) * c_head + pos * 2 * half, i, mask, x0, x1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    y = torch.empty_like(x2)
    _rms_norm[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]),
                                **FP_FUSION)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + r, rms_norm(x + r, weight, eps))."""
    x2, r2 = _rows(x), _rows(r.to(x.dtype))
    h, y = torch.empty_like(x2), torch.empty_like(x2)
    _add_rms_norm[(x2.shape[0],)](x2, r2, weight, h, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]),
                                    **FP_FUSION)
    return h.view(x.shape), y.view(x.shape)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[..., :H]) * gu[..., H:], H half of gu's last dimension."""
    g2 = _rows(gu)
    hidden = g2.shape[1] // 2
    y = torch.empty(g2.shape[0], hidden, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _silu_mul[(g2.shape[0], triton.cdiv(hidden, block))](g2, y, hidden, BLOCK=block, **FP_FUSION)
    return y.view(*gu.shape[:-1], hidden)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (bsz, seqlen, heads, head_dim), each head's elements contiguous, its tokens and heads at any stride (a
    view into the stacked q/k/v product); cos, sin (bsz, seqlen, head_dim/2) fp32. A new contiguous tensor."""
    bsz, seqlen, heads, hd = x.shape
    if x.stride(3) != 1 or x.stride(0) != seqlen * x.stride(1):
        x = x.contiguous()
    half = hd // 2
    y = torch.empty(bsz, seqlen, heads, hd, dtype=x.dtype, device=x.device)
    c, s = cos.float().contiguous(), sin.float().contiguous()
    _rotary[(bsz * seqlen, heads)](x, c, s, y, x.stride(1), x.stride(2), heads, half,
                                   BLOCK=triton.next_power_of_2(half), **FP_FUSION)
    return y


def rotary_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                 cache_v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """A decode step's stacked product qkv (bsz, seqlen, (hq + 2 hkv) * head_dim): q and k rotated, returned as
    (bsz, seqlen, hq + hkv, head_dim); k and v written to cache_k / cache_v (max_batch, hkv, max_seq_len,
    head_dim), batch row b at cache row rows[b], token t at position positions[b, t]. One kernel in place of
    rotary's and the two cache writes'."""
    bsz, seqlen, width = qkv.shape
    hd = width // (hq + 2 * hkv)
    if qkv.stride(2) != 1 or qkv.stride(0) != seqlen * qkv.stride(1):
        qkv = qkv.contiguous()
    half = hd // 2
    y = torch.empty(bsz, seqlen, hq + hkv, hd, dtype=qkv.dtype, device=qkv.device)
    c, s = cos.float().contiguous(), sin.float().contiguous()
    pos = positions.reshape(-1).contiguous()
    _rotary_cache[(bsz * seqlen, hq + 2 * hkv)](qkv, c, s, y, cache_k, cache_v, rows.contiguous(), pos, qkv.stride(1),
                                                hd, seqlen, hq, hkv, half, cache_k.stride(0), cache_k.stride(1),
                                                BLOCK=triton.next_power_of_2(half), **FP_FUSION)
    return y
