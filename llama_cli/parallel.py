"""Model-parallel layers with explicit communication context.

Each layer holds only its rank's slice of the weight, laid out as Meta's (fairscale)
checkpoints are split: column-parallel layers split the output features (dim 0),
row-parallel layers split the input features (dim 1) and all-reduce their outputs, the
embedding splits the embedding dimension (dim 1) and all-gathers. Unlike fairscale's own
layers, nothing here reads distributed global state in a constructor: the process group
arrives in a `ModelParallel`, and a world of one needs no process group at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


GEMV_MAX_ROWS = 2  # up to this many rows, compiled code computes x @ W.T as a fused multiply-and-sum


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. Compiled for the CPU, a few rows (batch-1 decoding) are written as a
    multiply-and-sum, which inductor turns into one streaming pass over the weight: about 3x the
    bandwidth of the BLAS matrix-vector product. (GPUs keep cuBLAS, which streams well.) A weight kept in
    its stored half width under fp32 activations (the CPU's default, see devices.keeps_half_weights) is
    widened for the product (compiled, inside the fused pass)."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if torch.compiler.is_compiling() and weight.device.type == "cpu" and x.shape[:-1].numel() <= GEMV_MAX_ROWS:
        return (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
    return F.linear(x, weight)


@dataclass(frozen=True)
class ModelParallel:
    world_size: int = 1
    rank: int = 0
    group: Optional[Any] = None  # a torch.distributed ProcessGroup when world_size > 1

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class _Weighted(nn.Module):
    """A (rows, columns) weight, dense or in a quantized form (quant.py: integers, group scales, int4
    offsets); set_quantized swaps the dense weight for the parts."""

    def __init__(self, rows: int, columns: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns))
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("qscale", None, persistent=False)
        self.register_buffer("qoffset", None, persistent=False)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> None:
        self.qweight, self.qscale, self.qoffset = q, scale, offset
        self.weight = None


class _Linear(_Weighted):
    """A linear layer's weight (out, in); quantized, it may be in a library kernel's form too."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__(out_features, in_features)
        self.register_buffer("kscales", None, persistent=False)
        self.kernel, self.kgroup = None, None  # a library kernel's form (quant.kernel_form), where one is used

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense-native":
            from .native import dense_linear

            return dense_linear(x, self.weight)
        if self.kernel is not None:
            from .quant import kernel_linear

            return kernel_linear(x, self)
        if self.qweight is not None:
            from .quant import quantized_linear

            return quantized_linear(x, self.qweight, self.qscale, self.qoffset, GEMV_MAX_ROWS)
        return linear(x, self.weight)


class ColumnParallelLinear(_Linear):
    """y = x W^T with W split on dim 0: (out_local, in). Output stays split unless gathered."""

    def __init__(self, in_features: int, out_local: int, mp: ModelParallel, gather_output: bool = False):
        super().__init__(out_local, in_features)
        self.mp, self.gather_output = mp, gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return self.mp.all_gather_last(y) if self.gather_output else y


class RowParallelLinear(_Linear):
    """y = sum over ranks of x_r W_r^T with W split on dim 1: (out, in_local)."""

    def __init__(self, in_local: int, out_features: int, mp: ModelParallel):
        super().__init__(out_features, in_local)
        self.mp = mp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mp.all_reduce(self.matmul(x))


class ParallelEmbedding(_Weighted):
    """Embedding table split on the embedding dimension: (vocab, dim / world_size); dense, or in a
    quantized form (quant.py), whose looked-up rows are dequantized into `dtype`."""

    def __init__(self, vocab_size: int, dim: int, mp: ModelParallel):
        super().__init__(vocab_size, dim // mp.world_size)
        self.mp = mp
        self.dtype = None  # the activations' dtype when quantized

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return self.mp.all_gather_last(F.embedding(tokens, self.weight))
        from .quant import dequantize

        offset = None if self.qoffset is None else self.qoffset[tokens].flatten(0, -2)
        rows = dequantize(self.qweight[tokens].flatten(0, -2), self.qscale[tokens].flatten(0, -2), offset,
                          self.dtype or torch.float32)
        return self.mp.all_gather_last(rows.reshape(*tokens.shape, -1))
