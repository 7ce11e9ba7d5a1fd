"""Choosing the next token from logits, on the logits' device."""

from __future__ import annotations

from typing import Optional, Union

import torch


def sample(logits: torch.Tensor, *, temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (bsz,) from logits (bsz, vocab). Temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p, top_k=top_k, generator=generator)


def sample_top_p(probs: torch.Tensor, p: Union[float, torch.Tensor], *, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw from the smallest set of most likely tokens whose mass reaches p (the nucleus),
    optionally also limited to the top_k most likely, renormalised. p: a float or (bsz,)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bsz, vocab)
    if isinstance(p, torch.Tensor):
        p = p.to(probs.device, probs.dtype)[:, None]
    # A token is outside the nucleus when the mass before it already reaches p.
    outside = torch.cumsum(probs_sort, dim=-1) - probs_sort > p
    if top_k is not None and top_k > 0:
        outside[..., top_k:] = True
    probs_sort = probs_sort.masked_fill(outside, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, *,
                top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Like `sample` with a temperature and top_p per row (bsz,); rows at temperature 0 are greedy."""
    greedy = torch.argmax(logits, dim=-1)
    t = temperature.to(logits.device, torch.float32)
    if not bool((t > 0).any()):
        return greedy
    probs = torch.softmax(logits.float() / t.clamp_min(1e-6)[:, None], dim=-1)
    drawn = sample_top_p(probs, top_p, top_k=top_k, generator=generator)
    return torch.where(t > 0, drawn, greedy)
