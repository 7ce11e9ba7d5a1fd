"""Choosing the next token from logits, on the logits' device, each row with its own settings.

The order, as in HF transformers' `generate` (so its logits processors are the reference):
  1. repetition_penalty (HF's definition): the logit of every token already in the prompt or the
     generation is divided by the penalty when positive, multiplied by it when negative;
  2. frequency_penalty and presence_penalty (OpenAI's definitions): logit -= count * frequency_penalty
     + (count > 0) * presence_penalty, counting the tokens generated so far;
  3. temperature 0: the most likely token (greedy); otherwise logits / temperature, then
  4. top_k: only the k most likely tokens (0: all);
  5. top_p: the smallest set of most likely tokens whose probability reaches top_p (the nucleus);
  6. min_p: only tokens at least min_p times as likely as the most likely one;
  7. a draw from what is left, renormalised.

The draws of a prompt depend on nothing but the prompt: each row's random numbers come from a stream keyed by
the run's seed and the prompt's place in the input (or by the prompt's own seed), the n-th generated token
taking the stream's n-th number (SplitMix64: counter-based, so no other row, step or schedule moves it). The
same command then samples the same tokens whatever batch a prompt runs in, with either schedule and after
--resume (up to rounding: a batch's shape can move a logit by an ulp, as for greedy near-ties).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .devices import is_cuda
from .settings import Settings


_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_OWN_SEED = 0x5EED5EED5EED5EED  # keeps a prompt's own seed's stream apart from the run-derived ones


def _mix64(x: int) -> int:
    """SplitMix64's output for the state x (before its increment)."""
    x = (x + _GAMMA) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(base: int, index: int, seed: Optional[int] = None) -> int:
    """The key of a prompt's draws: from its own seed alone where it has one (the same in any run or file), else
    from the run's base (Llama.new_base, drawn from --seed) and the prompt's index in the input."""
    if seed is not None:
        return _mix64(seed ^ _OWN_SEED)
    return _mix64((base + index * _GAMMA) & _M64)


def uniforms(keys: Sequence[int], draws: Sequence[int]) -> list[float]:
    """The draws[i]-th number of key i's stream, in [0, 1) on a grid of 2**-24 (exact in fp32)."""
    return [(_mix64((k + d * _GAMMA) & _M64) >> 40) / 2**24 for k, d in zip(keys, draws)]


def sample(logits: torch.Tensor, *, temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (bsz,) from logits (bsz, vocab), one setting for all rows. Temperature 0 is greedy."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p, top_k=top_k, generator=generator)


def filtered_probs(probs: torch.Tensor, p: Union[float, torch.Tensor], *, top_k=None, min_p=None):
    """(sorted probabilities with the excluded ones zeroed and the rest renormalised, their token ids).
    p, top_k, min_p: a number for all rows or a (bsz,) tensor; top_k 0 and min_p 0 are off."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bsz, vocab)
    bsz, vocab = probs.shape
    if isinstance(p, torch.Tensor):
        p = p.to(probs.device, probs.dtype)[:, None]
    beyond_k = None
    if top_k is not None:  # first the k most likely, renormalised (as HF's warpers do before top_p)
        k = torch.as_tensor(top_k, device=probs.device).reshape(-1, 1).expand(bsz, 1)
        k = torch.where(k > 0, k, vocab)
        beyond_k = torch.arange(vocab, device=probs.device)[None, :] >= k
        probs_sort = probs_sort.masked_fill(beyond_k, 0.0)
        probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    # A token is outside the nucleus when the mass before it already reaches p.
    outside = torch.cumsum(probs_sort, dim=-1) - probs_sort > p
    if beyond_k is not None:
        outside |= beyond_k
    if min_p is not None:
        m = torch.as_tensor(min_p, device=probs.device, dtype=probs.dtype).reshape(-1, 1)
        outside |= probs_sort < m * probs_sort[:, :1]
    outside[:, 0] = False  # the most likely token always stays
    probs_sort = probs_sort.masked_fill(outside, 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def sample_top_p(probs: torch.Tensor, p: Union[float, torch.Tensor], *, top_k=None, min_p=None,
                 generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw from the nucleus (and top_k / min_p where given), renormalised. p: a float or (bsz,). u: each row's
    number in [0, 1) (bsz,), taken through the distribution's inverse; without it torch draws with `generator`."""
    probs_sort, probs_idx = filtered_probs(probs, p, top_k=top_k, min_p=min_p)
    if u is None:
        choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
        return torch.gather(probs_idx, -1, choice).squeeze(-1)
    # through the inverse in token order, not in the sorted order: two tokens about as likely swap places in the
    # sort when a batch's rounding moves their logits by an ulp, which would move a whole token's share of u
    kept = torch.zeros_like(probs_sort).scatter_(-1, probs_idx, probs_sort)
    return inverse_cdf(kept, u).squeeze(-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(bsz, 1) indices: in each row the first whose cumulative probability passes u times the row's total, so
    each entry is chosen with its probability for u uniform in [0, 1). Entries of probability 0 are never chosen
    (a u rounded up to the total takes the last positive one)."""
    cdf = torch.cumsum(probs.float(), dim=-1)
    target = u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, positions, -1).max(dim=-1, keepdim=True).values
    return torch.minimum(choice, last)


def apply_penalties(logits: torch.Tensor, seen: Optional[torch.Tensor], counts: Optional[torch.Tensor],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Steps 1-2 above. logits (bsz, vocab); seen (bsz, vocab) bool: in the prompt or generated;
    counts (bsz, vocab): times generated; the penalties (bsz,)."""
    logits = logits.float()
    if seen is not None:
        r = repetition[:, None]
        penalized = torch.where(logits < 0, logits * r, logits / r)
        logits = torch.where(seen, penalized, logits)
    if counts is not None:
        logits = logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]
    return logits


class Sampler:
    """The next token for each row of a batch, with per-row settings and the token history the
    penalties need. Rows are cache rows: `set_row` when a prompt starts in one, `accept` after each
    step, `move_row` when the scheduler packs rows."""

    def __init__(self, n_rows: int, vocab: int, device: torch.device, generator: Optional[torch.Generator] = None):
        self.n, self.vocab, self.device, self.generator = n_rows, vocab, device, generator
        self.temperature = torch.zeros(n_rows, device=device)
        self.top_p = torch.ones(n_rows, device=device)
        self.top_k = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.min_p = torch.zeros(n_rows, device=device)
        self.repetition = torch.ones(n_rows, device=device)
        self.presence = torch.zeros(n_rows, device=device)
        self.frequency = torch.zeros(n_rows, device=device)
        self.settings: list[Optional[Settings]] = [None] * n_rows
        self.keys: list[Optional[int]] = [None] * n_rows  # each row's stream (stream_key)
        self.seen: Optional[torch.Tensor] = None  # allocated when a row uses a penalty
        self.counts: Optional[torch.Tensor] = None

    def set_row(self, i: int, s: Settings, prompt: Sequence[int], key: Optional[int] = None) -> None:
        """Row i starts a prompt: its settings, its tokens (for the penalties) and its stream's key (stream_key;
        without one, rows draw through torch with the sampler's generator)."""
        self.settings[i], self.keys[i] = s, key
        self.temperature[i], self.top_p[i], self.top_k[i], self.min_p[i] = s.temperature, s.top_p, s.top_k, s.min_p
        self.repetition[i], self.presence[i], self.frequency[i] = (s.repetition_penalty, s.presence_penalty,
                                                                   s.frequency_penalty)
        if s.penalized and self.seen is None:
            self.seen = torch.zeros(self.n, self.vocab, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(self.n, self.vocab, device=self.device)
        if self.seen is not None:
            self.seen[i] = False
            self.counts[i] = 0
            if prompt:
                self.seen[i, torch.as_tensor(list(prompt), device=self.device)] = True

    def move_row(self, src: int, dst: int) -> None:
        for t in (self.temperature, self.top_p, self.top_k, self.min_p, self.repetition, self.presence,
                  self.frequency) + ((self.seen, self.counts) if self.seen is not None else ()):
            t[dst] = t[src]
        self.settings[dst], self.keys[dst] = self.settings[src], self.keys[src]

    def accept(self, tokens: torch.Tensor, forced: Optional[torch.Tensor] = None,
               rows: Optional[torch.Tensor] = None) -> None:
        """Record the tokens just placed in rows 0..n-1, or in `rows` (forced: rows whose token came
        from the prompt, which count as seen but not as generated)."""
        if self.seen is None:
            return
        n = tokens.shape[0]
        rows = torch.arange(n, device=self.device) if rows is None else rows
        self.seen[rows, tokens] = True
        gen = torch.ones(n, device=self.device) if forced is None else (~forced).float()
        self.counts[rows, tokens] += gen

    def sample(self, logits: torch.Tensor, rows: Optional[Sequence[int]] = None,
               draws: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Token ids (n,) from logits (n, vocab) of rows 0..n-1, or of the given rows. draws: for each, how many
        tokens its prompt has generated before this one (the number its stream gives)."""
        n = logits.shape[0]
        idx = slice(0, n) if rows is None else torch.as_tensor(list(rows), device=self.device)
        live = [s for s in (self.settings[:n] if rows is None else [self.settings[r] for r in rows]) if s is not None]
        if self.seen is not None and any(s.penalized for s in live):
            logits = apply_penalties(logits, self.seen[idx], self.counts[idx], self.repetition[idx],
                                     self.presence[idx], self.frequency[idx])
        greedy = torch.argmax(logits, dim=-1)
        if all(s.greedy for s in live):
            return greedy
        t = self.temperature[idx]
        probs = torch.softmax(logits.float() / t.clamp_min(1e-6)[:, None], dim=-1)
        drawn = sample_top_p(probs, self.top_p[idx], top_k=self.top_k[idx], min_p=self.min_p[idx],
                             generator=self.generator, u=self._uniforms(n, rows, draws))
        return torch.where(t > 0, drawn, greedy)

    def _uniforms(self, n: int, rows, draws) -> Optional[torch.Tensor]:
        """Each row's number for this draw, on the device; None where no row has a stream key (a caller of its
        own: torch draws). Rows never started (fed anything between live ones) take key 0."""
        keys = self.keys[:n] if rows is None else [self.keys[r] for r in rows]
        if all(k is None for k in keys):
            return None
        keys = [0 if k is None else k for k in keys]
        u = torch.tensor(uniforms(keys, [0] * n if draws is None else draws), dtype=torch.float32)
        if is_cuda(self.device):  # from pinned memory: a copy that does not wait for the steps in flight
            return u.pin_memory().to(self.device, non_blocking=True)
        return u.to(self.device)
