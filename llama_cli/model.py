"""The LLaMA transformer: math only.

No file or network I/O and no process-group calls live here: the model-parallel layers
take their communication context (`parallel.ModelParallel`) as an argument, so the model
can be built and run in a single process without `torch.distributed` being initialised.

Layouts follow Meta's checkpoints: rotary embeddings rotate interleaved pairs
(x[2i], x[2i+1]); `wq, wk, wv, w1, w3, output` are column-parallel, `wo, w2`
row-parallel, `tok_embeddings` split along the embedding dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .parallel import ColumnParallelLinear, ModelParallel, ParallelEmbedding, RowParallelLinear, linear


@dataclass
class ModelArgs:
    """The model's dimensions, as params.json gives them (read by checkpoint.args_from_params). Run
    limits (batch size, sequence length) are not part of it: the decode engine's cache owns them."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: the tokenizer's size (checkpoint.resolve_vocab_size)
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    # Not in Meta's params.json: Llama 3.x rope scaling values other than 3.1's (factor 8, low and
    # high frequency factors 1 and 4, original context 8192), as converted from HF configs; or linear
    # scaling, {"rope_type": "linear", "factor": F} (positions divided by F, as HF's and llama.cpp's).
    rope_scaling: Optional[dict] = None
    # Not in Meta's params.json: an explicit FFN width, for checkpoints converted from
    # formats that state it (Meta's rule below cannot produce every width).
    ffn_hidden_dim: Optional[int] = None
    # Not in Meta's params.json: {"mode": "int8" | "int4", "group_size": G} when the checkpoint stores its
    # linear layers quantized (quant.py; written by llama-cli quantize, or convert from a GGUF).
    quantization: Optional[dict] = None
    # Not in Meta's params.json: the positions the model was trained for, where a converted format states it
    # (GGUF's context_length, HF's max_position_embeddings); a longer --max_seq_len is warned about.
    context_length: Optional[int] = None
    # Derived in __post_init__.
    head_dim: int = field(init=False)
    hidden_dim: int = field(init=False)
    rope_kind: Optional[str] = field(init=False)  # None, "llama3" or "linear"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
            if getattr(self, name) < 1:
                raise UserError(f"params.json: '{name}' must be a positive integer, got {getattr(self, name)}")
        if self.context_length is not None and self.context_length < 1:
            raise UserError(f"params.json: 'context_length' must be a positive integer, got {self.context_length}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError("params.json: 'norm_eps' and 'rope_theta' must be positive")
        self.rope_kind = kind = (self.rope_scaling or {}).get("rope_type", "llama3" if self.use_scaled_rope else None)
        factor = (self.rope_scaling or {}).get("factor", 8.0 if kind == "llama3" else 1.0)
        if kind not in (None, "llama3", "linear") or (kind == "llama3") != self.use_scaled_rope:
            raise UserError(f"params.json: rope_scaling of type {kind!r} is not supported (llama3, with "
                            "use_scaled_rope true, or linear)")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0 or \
                (kind == "linear" and "factor" not in self.rope_scaling):
            raise UserError(f"params.json: rope_scaling needs a positive number as its factor, got {factor!r}")
        if self.dim % self.n_heads:
            raise UserError(f"params.json: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"params.json: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise UserError(f"params.json: the head size dim/n_heads={self.head_dim} must be even for rotary "
                            "embeddings")
        self.hidden_dim = self.ffn_hidden_dim or ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)



def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1's long-context scaling or linear scaling if asked."""
    even = torch.arange(0, args.head_dim, 2, device=device, dtype=torch.float64)
    freqs = 1.0 / (args.rope_theta ** (even / args.head_dim))
    if args.rope_kind == "linear":
        freqs = freqs / args.rope_scaling["factor"]
    elif args.rope_kind == "llama3":
        sc = args.rope_scaling or {}
        freqs = scale_rope_frequencies(freqs, factor=sc.get("factor", 8.0),
                                       low_freq_factor=sc.get("low_freq_factor", 1.0),
                                       high_freq_factor=sc.get("high_freq_factor", 4.0),
                                       old_context_len=sc.get("original_max_position_embeddings", 8192))
    return freqs.float()


def scale_rope_frequencies(freqs: torch.Tensor, factor: float = 8.0, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Llama 3.1 rope scaling: long wavelengths slowed by `factor`, short ones kept, smooth between."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / factor, smoothed)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)


# The eager GPU step's norms, residual adds, rotary embedding and gated unit through triton_step's kernels (one
# kernel each, ~6 fewer a layer for CUDA graphs to replay): a knob, off until timed on a GPU (gpu_check).
FUSED_SMALL_OPS = False


def _fused(x: torch.Tensor):
    """triton_step, where FUSED_SMALL_OPS is on and its kernels can run on `x`; else None."""
    if not FUSED_SMALL_OPS:
        return None
    from . import triton_step

    return triton_step if triton_step.use(x) else None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate interleaved pairs. x: (bsz, seqlen, heads, head_dim); cos/sin: (bsz, seqlen, head_dim/2);
    cis: cos + i sin, when the caller made it once for all layers.

    Eager, as one complex multiplication (3 kernels instead of a dozen: the eager step is
    launch-bound); compiled, in real arithmetic, which inductor fuses into its neighbours."""
    kernels = _fused(x)
    if kernels is not None:
        return kernels.rotary(x, cos, sin)
    if not torch.compiler.is_compiling():
        cis = torch.complex(cos, sin) if cis is None else cis
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (bsz, seqlen, heads, head_dim/2)
        return torch.view_as_real(xc * cis[:, :, None, :]).flatten(-2).type_as(x)
    xf = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, heads, head_dim/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Meta's RMSNorm: normalised in fp32, rounded to x's dtype, then scaled. PyTorch's rms_norm computes in
    fp32 for 16-bit inputs, so no casts around it: two kernels a norm where the eager step is launch-bound
    (GPUs), not four (one with FUSED_SMALL_OPS)."""
    kernels = _fused(x)
    if kernels is not None and weight.dtype == x.dtype:
        return kernels.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, mp: ModelParallel):
        super().__init__()
        self.n_local_heads = args.n_heads // mp.world_size
        # With more ranks than KV heads, each rank holds one (repeated) KV head.
        self.n_local_kv_heads = max(1, args.n_kv_heads // mp.world_size)
        self.head_dim = args.head_dim
        hd = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, self.n_local_heads * hd, mp)
        self.wk = ColumnParallelLinear(args.dim, self.n_local_kv_heads * hd, mp)
        self.wv = ColumnParallelLinear(args.dim, self.n_local_kv_heads * hd, mp)
        self.wo = RowParallelLinear(self.n_local_heads * hd, args.dim, mp)
        # wq, wk, wv stacked by fuse(): one matmul instead of three (a buffer, so that a compiled layer
        # sees it as an input like the other weights, not as a constant of one layer)
        self.register_buffer("wqkv", None, persistent=False)
        # The KV cache, allocated by the decode engine (engine.py). Registered (not saved) so .to()
        # moves them and torch.compile treats them as module state.
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, cos, sin, ctx: "StepContext") -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        hq, hkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        cached = False  # the new keys and values already in the cache
        if self.wqkv is not None:  # stacked: q and k side by side, rotated together (half the kernels)
            qkv = linear(x, self.wqkv)
            kernels = _fused(qkv) if not ctx.prefill and ctx.segments is None else None
            if kernels is not None and self._plain_cache():  # rotated and written to the cache in one kernel
                qk = kernels.rotary_cache(qkv, cos, sin, self.cache_k, self.cache_v, ctx.rows, ctx.positions, hq, hkv)
                cached = True
            else:
                qk = apply_rotary(qkv[..., :(hq + hkv) * hd].view(bsz, seqlen, hq + hkv, hd), cos, sin, ctx.cis)
            q, k = qk.split([hq, hkv], dim=2)
            v = qkv[..., (hq + hkv) * hd:].view(bsz, seqlen, hkv, hd)
        else:
            q = apply_rotary(self.wq(x).view(bsz, seqlen, hq, hd), cos, sin, ctx.cis)
            k = apply_rotary(self.wk(x).view(bsz, seqlen, hkv, hd), cos, sin, ctx.cis)
            v = self.wv(x).view(bsz, seqlen, hkv, hd)

        if ctx.segments is not None:  # several prompts packed into one row, each from position 0
            return self.wo(self._packed(q, k, v, ctx).reshape(bsz, seqlen, -1))
        # The cache writes: row r, position p <- the new key/value. Cache layout:
        # (max_batch, n_local_kv_heads, max_seq_len, head_dim). One kernel each, no host sync.
        # The cache may hold another type than the activations (--kv_cache_dtype): rounded into it here, and
        # widened back where a step reads it (a no-op where the types agree).
        kind = self.cache_k.dtype
        if ctx.prefill:  # positions 0..seqlen-1 of the given rows
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (bsz, kv_heads, seqlen, head_dim)
            self.cache_k[:, :, :seqlen].index_copy_(0, ctx.rows, k.to(kind))
            self.cache_v[:, :, :seqlen].index_copy_(0, ctx.rows, v.to(kind))
        elif not cached:  # rows 0..bsz-1, each at its own position (scatter_ would cost the whole cache on the CPU)
            rows = ctx.rows[:, None]
            self.cache_k[rows, :, ctx.positions] = k.to(kind)  # indexed shape (bsz, 1, kv_heads, head_dim)
            self.cache_v[rows, :, ctx.positions] = v.to(kind)
        gqa = hq != hkv
        if ctx.prefill:
            # a prompt from position 0: attend over its own keys, causally (padding sits after each row's end)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=seqlen > 1, enable_gqa=gqa)
        else:
            # one token per row, rows 0..bsz-1, over the first kv_len cache positions (read off the
            # mask's shape when there is one, so that a compiled layer keeps it symbolic)
            kv_len = ctx.kv_len if ctx.mask is None else ctx.mask.shape[-1]
            keys = self.cache_k[:bsz, :, :kv_len].to(q.dtype)  # (bsz, n_local_kv_heads, kv_len, head_dim)
            values = self.cache_v[:bsz, :, :kv_len].to(q.dtype)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=ctx.mask,
                                                 enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _plain_cache(self) -> bool:
        """Whether the KV cache has the layout rotary_cache writes: (rows, kv heads, positions, head_dim),
        contiguous, keys and values alike."""
        k, v = self.cache_k, self.cache_v
        return k is not None and k.is_contiguous() and v.is_contiguous() and k.shape == v.shape

    def _packed(self, q, k, v, ctx) -> torch.Tensor:
        """Attention for prompts packed one after another into one batch row (q, k, v: (1, total, heads,
        head_dim)): each prompt, ctx.segments' (cache row, start, end, offset), is written to its cache row from
        position offset and attends causally over its own keys, after the row's first offset positions where
        offset > 0 (read from the cache). Returns (1, total, heads, head_dim)."""
        outs = []
        for row, start, end, offset in ctx.segments:
            qi, ki, vi = (t[0, start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, head_dim)
            n = end - start
            self.cache_k[row, :, offset:offset + n] = ki
            self.cache_v[row, :, offset:offset + n] = vi
            mask = None
            if offset:
                ki = torch.cat([self.cache_k[row, :, :offset].to(qi.dtype), ki], dim=1)
                vi = torch.cat([self.cache_v[row, :, :offset].to(qi.dtype), vi], dim=1)
                mask = torch.arange(offset + n, device=qi.device)[None, :] <= \
                    torch.arange(offset, offset + n, device=qi.device)[:, None]
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=not offset and n > 1,
                                                       enable_gqa=qi.shape[0] != ki.shape[0]))
        return torch.cat(outs, dim=1).transpose(0, 1)[None]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, mp: ModelParallel):
        super().__init__()
        self.w1 = ColumnParallelLinear(args.dim, args.hidden_dim // mp.world_size, mp)
        self.w2 = RowParallelLinear(args.hidden_dim // mp.world_size, args.dim, mp)
        self.w3 = ColumnParallelLinear(args.dim, args.hidden_dim // mp.world_size, mp)
        self.register_buffer("w13", None, persistent=False)  # w1 and w3 stacked by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gu = linear(x, self.w13)
            kernels = _fused(gu)
            if kernels is not None:
                return self.w2(kernels.silu_mul(gu))
            gate, up = gu.chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, mp: ModelParallel):
        super().__init__()
        self.attention = Attention(args, mp)
        self.feed_forward = FeedForward(args, mp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, ctx) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, ctx)
        kernels = _fused(x)
        if kernels is not None and a.dtype == x.dtype == self.ffn_norm.weight.dtype:  # the add and the norm after it
            h, normed = kernels.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
            return h + self.feed_forward(normed)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class StepContext:
    """What every layer needs to know about one forward step."""
    positions: torch.Tensor  # (bsz, seqlen) absolute positions of the new tokens
    rows: torch.Tensor  # (bsz,) the cache row each batch row writes to
    prefill: bool  # tokens from position 0, attending over themselves (else: one token per row)
    kv_len: int = 0  # decode: how many cache positions to attend over
    mask: Optional[torch.Tensor] = None  # decode: (bsz, 1, 1, kv_len) bool, or None for all of them
    cis: Optional[torch.Tensor] = None  # eager: the rotary factors cos + i sin (bsz, seqlen, head_dim/2)
    # packed prefill: each prompt's (cache row, start, end, offset) in the one batch row, offset the cache position
    # of its first token (past a beginning its row holds already: Engine.prefill_after)
    segments: Optional[list] = None


def run_block(block: TransformerBlock, x, cos, sin, ctx) -> torch.Tensor:
    """One layer (a plain function, so the decode engine can compile it once for every layer)."""
    return block(x, cos, sin, ctx)


def run_head(model: "Transformer", h: torch.Tensor) -> torch.Tensor:
    """Final norm and output layer: fp32 logits."""
    return model.output(model.norm(h)).float()


class Transformer(nn.Module):
    """The model. Forward passes come in two kinds, both writing the KV cache that the decode engine
    allocated with `allocate_cache`: `prefill` (whole prompts from position 0, any cache rows) and
    `decode` (one token per row at its own position, rows 0..n-1)."""

    def __init__(self, args: ModelArgs, mp: Optional[ModelParallel] = None):
        super().__init__()
        mp = mp or ModelParallel()
        check_parallel(args, mp.world_size)
        self.params = args
        self.mp = mp
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, mp)
        self.layers = nn.ModuleList(TransformerBlock(args, mp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size // mp.world_size, mp, gather_output=True)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        # the decode step's layer and output functions; the engine may swap in compiled versions
        self.decode_block_fn = run_block
        self.decode_head_fn = run_head

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def allocate_cache(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate the static KV caches and rotary tables on the weights' device."""
        weight = self.norm.weight  # the activations' dtype and the device (embeddings may be quantized)
        self.tok_embeddings.dtype = weight.dtype
        dtype = dtype or weight.dtype
        for layer in self.layers:
            attn = layer.attention
            shape = (max_batch_size, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
            attn.cache_k = torch.zeros(shape, dtype=dtype, device=weight.device)
            attn.cache_v = torch.zeros(shape, dtype=dtype, device=weight.device)
        freqs = rope_frequencies(self.params, device=weight.device)
        angles = torch.outer(torch.arange(max_seq_len, device=weight.device, dtype=torch.float32), freqs)
        self.rope_cos, self.rope_sin = torch.cos(angles), torch.sin(angles)  # (max_seq_len, head_dim/2)

    @torch.no_grad()
    def fuse(self) -> None:
        """Stack wq/wk/wv and w1/w3 into one weight each (fewer, larger matmuls). The separate
        weights become views into the stacked ones, so no memory is added."""
        def stack(mods):
            fused = torch.cat([m.weight for m in mods])
            offset = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight = nn.Parameter(fused[offset:offset + n], requires_grad=False)
                offset += n
            return fused

        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            a.wqkv = stack([a.wq, a.wk, a.wv])
            f.w13 = stack([f.w1, f.w3])

    @torch.no_grad()
    def move_cache_row(self, src: int, dst: int, n: Optional[int] = None) -> None:
        """Copy one batch row of every layer's KV cache (its first n positions, where given) to another row."""
        for layer in self.layers:
            for cache in (layer.attention.cache_k, layer.attention.cache_v):
                cache[dst, :, :n].copy_(cache[src, :, :n])

    def _run(self, tokens: torch.Tensor, ctx: StepContext, block_fn=run_block) -> torch.Tensor:
        cos, sin = self.rope_cos[ctx.positions], self.rope_sin[ctx.positions]  # (bsz, seqlen, head_dim/2)
        if block_fn is run_block:
            ctx.cis = torch.complex(cos, sin)  # once for every layer (a compiled layer uses cos and sin)
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            h = block_fn(layer, h, cos, sin, ctx)
        return h

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None,
                last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompts from position 0: tokens (bsz, seqlen), right-padded where rows differ in length,
        written to cache `rows` (default 0..bsz-1). Returns fp32 logits (bsz, seqlen, vocab), or
        (bsz, vocab) at index `last` (bsz,) of each row (its last real token) when given."""
        if self.rope_cos is None:
            raise RuntimeError("allocate_cache() before prefill()")
        device = self.device
        tokens = tokens.to(device)  # inputs follow the weights: no "tensors on different devices"
        bsz, seqlen = tokens.shape
        rows = torch.arange(bsz, device=device) if rows is None else rows.to(device)
        positions = torch.arange(seqlen, device=device)[None, :].expand(bsz, seqlen)
        h = self._run(tokens, StepContext(positions, rows, prefill=True))
        if last is not None:
            h = h[torch.arange(bsz, device=device), last.to(device)]  # (bsz, dim)
        return run_head(self, h)

    @torch.no_grad()
    def prefill_packed(self, prompts: list, rows: list, offsets: Optional[list] = None) -> torch.Tensor:
        """Prompts of any lengths (lists of token ids) packed one after another into one batch row, none
        padded, prompt i written to cache row rows[i] from position offsets[i] (default 0; the row's positions
        before it hold the keys and values of the tokens that precede it): fp32 logits (n, vocab) of each
        prompt's last token."""
        if self.rope_cos is None:
            raise RuntimeError("allocate_cache() before prefill()")
        device = self.device
        offsets = offsets or [0] * len(prompts)
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()
        segments = list(zip(rows, [0] + ends[:-1], ends, offsets))
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
        positions = torch.cat([torch.arange(o, o + len(p), device=device) for p, o in zip(prompts, offsets)])[None]
        ctx = StepContext(positions, torch.as_tensor(rows, device=device), prefill=True, segments=segments)
        h = self._run(tokens, ctx)
        return run_head(self, h[0, torch.tensor(ends, device=device) - 1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
               masked: bool = True, eager: bool = False) -> torch.Tensor:
        """One token per row: tokens (bsz,) written at per-row `positions` (bsz,) of cache rows
        0..bsz-1, each attending over cache positions <= its own, within the first kv_len (which
        must exceed every position). masked=False when every row is at kv_len - 1 (no mask needed).
        eager=True runs the plain layer functions even where compiled ones were set.
        Static shapes for a given (bsz, kv_len): the step CUDA graphs capture. fp32 logits (bsz, vocab)."""
        block_fn, head_fn = (run_block, run_head) if eager else (self.decode_block_fn, self.decode_head_fn)
        device = self.device
        bsz = tokens.shape[0]
        positions = positions.to(device)
        mask = None
        if masked:
            mask = (torch.arange(kv_len, device=device)[None, :] <= positions[:, None])[:, None, None, :]
            if block_fn is not run_block:
                torch._dynamo.maybe_mark_dynamic(mask, 3)  # one compiled layer for every kv_len
        ctx = StepContext(positions[:, None], torch.arange(bsz, device=device), prefill=False,
                          kv_len=0 if masked else kv_len, mask=mask)
        h = self._run(tokens.to(device)[:, None], ctx, block_fn)
        return head_fn(self, h[:, 0])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab) for whole sequences from position 0 (cache rows 0..bsz-1)."""
        return self.prefill(tokens)


def check_parallel(args: ModelArgs, world_size: int, shards: bool = False) -> None:
    """Refuse model-parallel sizes (with shards: shard counts to write) that would split a head or a weight
    unevenly."""
    if world_size == 1:
        return
    if not _divides(args, world_size):
        top = args.n_kv_heads if shards else args.n_heads  # a shard holds whole KV heads (CheckpointWriter)
        ok = ", ".join(str(n) for n in range(1, top + 1) if _divides(args, n))
        why = (f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, dim={args.dim}, "
               f"vocab_size={args.vocab_size})")
        if shards:
            raise UserError(f"this model cannot be split into {world_size} shards {why}; write one of these shard "
                            f"counts: {ok}")
        raise UserError(f"this model cannot be split over {world_size} processes {why}; run with one of these "
                        f"process counts: {ok}")


def _divides(args: ModelArgs, n: int) -> bool:
    kv_ok = args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0
    return (args.n_heads % n == 0 and kv_ok and args.dim % n == 0
            and args.hidden_dim % n == 0 and args.vocab_size % n == 0)
