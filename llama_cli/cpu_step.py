"""The CPU decode step as one native call per layer (csrc/decode_layer.h): for a small model the ~20 operator
calls of an eager layer, or a compiled layer's call with dynamo's checks, cost more than the layer's
products, so a layer's norms, products (our kernels), rotary embedding, cache writes, attention and
feed-forward run in one C++ call. Each row attends over its own positions only, so a step costs what the
live tokens need, and rows at different positions (continuous batching) need no mask.

With model parallelism (torchrun, gloo) each layer is two native calls, its attention and its feed-forward
halves, each output all-reduced across the processes before its residual is added, as the eager layers do.

Used by the decode engine for uncompiled steps on the CPU with fp32 activations, where every layer's linear
weights are on our kernels (native.py: int4, int8, or dense fp32/bf16/fp16), for any number of rows (beyond a
few rows the products go to PyTorch's matrix product, as the eager layers' do). Its results are the eager
layers' up to the order of the additions (tests/test_cpu_step.py)."""

from __future__ import annotations

from typing import Optional

import torch

from .model import Transformer, run_head


def _parts(m) -> Optional[list]:
    """A linear layer's tensors in decode_layer's form, or None where it is not on our kernels."""
    if m.kernel == "dense-native":  # (native.use_dense marks contiguous fp32, bf16 or fp16 weights only)
        return [m.weight]
    if m.kernel == "int8-native":
        return [m.qweight, m.qscale]
    if m.kernel == "int4-native":
        return [m.qweight, m.qscale, m.qoffset]
    return None


class NativeStep:
    """model.decode for rows 0..n-1, through llama_cli::decode_layer."""

    def __init__(self, model: Transformer, layers: list):
        self.model, self.layers = model, layers
        self.op = torch.ops.llama_cli.decode_layer

    @staticmethod
    def prepare(model: Transformer) -> Optional["NativeStep"]:
        """The step for `model`, or None where it does not apply (see the module's doc)."""
        if model.device.type != "cpu" or model.norm.weight.dtype != torch.float32:
            return None
        layers = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            parts = [_parts(m) for m in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2)]
            if any(p is None for p in parts):
                return None
            layers.append((layer, parts, layer.attention_norm.weight, layer.ffn_norm.weight,
                           layer.attention_norm.eps))
        return NativeStep(model, layers)

    @staticmethod
    def replaces_compiling(model: Transformer) -> bool:
        """Whether --compile auto leaves `model` uncompiled for this step: it applies, in one process (under
        torchrun the layers' native halves measured slower than the compiled step, 38.6 against 44.7 tok/s on
        2 processes, so there auto weighs compiling as for our kernels)."""
        return model.mp.world_size == 1 and NativeStep.prepare(model) is not None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 logits (n, vocab) for tokens (n,) at positions (n,) of cache rows 0..n-1."""
        m, op = self.model, self.op
        h = m.tok_embeddings(tokens[:, None])[:, 0].contiguous()  # (n, dim)
        positions = positions.contiguous()
        cos, sin = m.rope_cos, m.rope_sin
        if m.mp.world_size > 1:
            return self._parallel(h, positions)
        for layer, (wq, wk, wv, wo, w1, w3, w2), an, fn, eps in self.layers:
            a = layer.attention
            h = op(h, wq, wk, wv, wo, w1, w3, w2, an, fn, eps, a.cache_k, a.cache_v, positions, cos, sin)
        return run_head(m, h)

    def _parallel(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        m, ops = self.model, torch.ops.llama_cli
        for layer, (wq, wk, wv, wo, w1, w3, w2), an, fn, eps in self.layers:
            a = layer.attention
            part = ops.decode_attention(h, wq, wk, wv, wo, an, eps, a.cache_k, a.cache_v, positions, m.rope_cos,
                                        m.rope_sin)
            h = h + m.mp.all_reduce(part)
            h = h + m.mp.all_reduce(ops.decode_feed_forward(h, w1, w3, w2, fn, eps))
        return run_head(m, h)
