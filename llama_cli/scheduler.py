"""Running many prompt requests through a `Llama`, batch by batch, reporting each result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UserError
from .prompts import PromptRequest, Result


@dataclass
class Defaults:
    max_gen_len: int
    temperature: float
    top_p: float
    top_k: Optional[int] = None
    logprobs: bool = False
    echo: bool = False
    strict: bool = False


@dataclass
class Stats:
    prompts: int = 0
    tokens: int = 0
    errors: int = 0
    first_token_s: Optional[float] = None


def prepare(llama, requests: list[PromptRequest], d: Defaults) -> tuple[list, list[Result]]:
    """Tokenise; prompts that leave no room to generate become error results (or fail with --strict)."""
    ready, failed = [], []
    max_seq_len = llama.model.params.max_seq_len
    for req in requests:
        ids = llama.tokenizer.encode(req.prompt, bos=llama.tokenizer.add_bos, eos=False)
        if len(ids) >= max_seq_len:
            msg = (f"has {len(ids)} tokens but max_seq_len is {max_seq_len}, leaving no room to generate; "
                   f"raise --max_seq_len or shorten the prompt")
            if d.strict:
                raise UserError(f"prompt {req.index + 1}: {msg}")
            failed.append(Result(req, error=msg))
        else:
            ready.append((req, ids))
    return ready, failed


def _begin(llama, requests, d: Defaults, on_result) -> tuple[Stats, float, list]:
    """Start a run: report prompts that cannot run; returns (stats, start time, runnable prompts)."""
    stats, start = Stats(), time.perf_counter()
    ready, failed = prepare(llama, requests, d)
    for r in failed:
        stats.errors += 1
        on_result(r)
    return stats, start, ready


def run_static(llama, requests: list[PromptRequest], d: Defaults, on_result: Callable[[Result], None],
               on_progress: Optional[Callable[[Stats], None]] = None,
               on_step: Optional[Callable[[list[int]], None]] = None) -> Stats:
    """Meta's static batching: max_batch_size prompts at a time, each batch run to its longest row."""
    stats, start, ready = _begin(llama, requests, d, on_result)
    bs = llama.model.params.max_batch_size

    def step_hook(tokens):
        if stats.first_token_s is None:
            stats.first_token_s = time.perf_counter() - start
        if on_step is not None:
            on_step(tokens)

    for i in range(0, len(ready), bs):
        batch = ready[i:i + bs]
        reqs = [r for r, _ in batch]
        tokens, logprobs = llama.generate_rows(
            [ids for _, ids in batch],
            [r.max_gen_len or d.max_gen_len for r in reqs],
            [d.temperature if r.temperature is None else r.temperature for r in reqs],
            [d.top_p if r.top_p is None else r.top_p for r in reqs],
            logprobs=d.logprobs, echo=d.echo, top_k=d.top_k, on_step=step_hook)
        for j, (req, toks) in enumerate(zip(reqs, tokens)):
            stats.prompts += 1
            stats.tokens += len(toks)
            on_result(Result(req, generation=llama.tokenizer.decode(toks), tokens=toks,
                             logprobs=logprobs[j] if logprobs else None))
        if on_progress is not None:
            on_progress(stats)
    return stats


@dataclass
class _Slot:
    request: PromptRequest
    ids: list  # prompt token ids
    max_gen: int
    temperature: float
    top_p: float
    pos: int = 0  # cache position the next fed token is written to
    generated: list = None
    logprobs: list = None


def run_continuous(llama, requests: list[PromptRequest], d: Defaults, on_result: Callable[[Result], None],
                   on_progress: Optional[Callable[[Stats], None]] = None,
                   on_step: Optional[Callable[[list[int]], None]] = None) -> Stats:
    """Continuous batching: each of max_batch_size slots holds one prompt at its own cache
    position; a slot whose prompt finishes (stop token, its max_gen_len, or the end of the
    cache) is refilled with the next prompt at once, so no slot idles while others run on.
    Results are reported as they finish (callers restore input order)."""
    import torch
    import torch.nn.functional as F

    from .sampling import sample_rows

    stats, start, ready = _begin(llama, requests, d, on_result)
    model, device = llama.model, llama.device
    bs, max_seq_len = model.params.max_batch_size, model.params.max_seq_len
    stop_ids = llama.tokenizer.stop_ids
    slots: list[Optional[_Slot]] = [None] * bs
    queue = list(reversed(ready))  # pop() takes the next prompt in input order
    last = torch.zeros(bs, dtype=torch.long, device=device)  # the token each slot feeds next
    temps = torch.zeros(bs, device=device)
    tops = torch.ones(bs, device=device)

    def finish(i: int) -> None:
        s = slots[i]
        toks = s.generated
        lps = s.logprobs if d.logprobs else None
        if d.echo:
            toks = s.ids + toks
        stats.prompts += 1
        stats.tokens += len(s.generated)
        slots[i] = None
        on_result(Result(s.request, generation=llama.tokenizer.decode(toks), tokens=toks, logprobs=lps))
        if on_progress is not None:
            on_progress(stats)

    def accept(i: int, token: int, logprob: Optional[float]) -> None:
        """Record slot i's next token; finish the slot if that ends it."""
        s = slots[i]
        if stats.first_token_s is None:
            stats.first_token_s = time.perf_counter() - start
        if on_step is not None:
            on_step([token])
        if token in stop_ids:
            return finish(i)
        s.generated.append(token)
        if d.logprobs:
            s.logprobs.append(logprob)
        # s.pos is where this token goes in the cache; stop when no room is left for the next one
        if len(s.generated) >= s.max_gen or s.pos + 1 >= max_seq_len:
            return finish(i)
        last[i] = token

    def refill(i: int) -> None:
        req, ids = queue.pop()
        s = _Slot(req, ids, req.max_gen_len or d.max_gen_len,
                  d.temperature if req.temperature is None else req.temperature,
                  d.top_p if req.top_p is None else req.top_p, pos=len(ids), generated=[], logprobs=[])
        slots[i] = s
        temps[i], tops[i] = s.temperature, s.top_p
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        rows = torch.tensor([i], device=device)
        if d.echo and d.logprobs:  # log-probabilities of the prompt's own tokens too
            logits = model(tokens, 0, rows=rows)
            prompt_lp = -F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
            s.logprobs = [0.0] + prompt_lp.tolist()
            logits = logits[:, -1:]
        else:
            logits = model(tokens, 0, rows=rows, output_index=torch.tensor([len(ids) - 1], device=device))
        tok = sample_rows(logits[:, -1], temps[i:i + 1], tops[i:i + 1], top_k=d.top_k, generator=llama.generator)
        lp = torch.log_softmax(logits[0, -1], -1)[tok].item() if d.logprobs else None
        accept(i, int(tok), lp)

    def pack() -> None:
        """Once no prompts are left to start, move live slots down into free ones, so each step
        runs only over rows 0..n-1 (a view of the cache, no gather)."""
        for i in range(bs):
            if slots[i] is None:
                j = max((k for k in range(i + 1, bs) if slots[k] is not None), default=None)
                if j is None:
                    return
                model.move_cache_row(j, i)
                slots[i], slots[j] = slots[j], None
                last[i], temps[i], tops[i] = last[j], temps[j], tops[j]

    while queue or any(slots):
        for i in range(bs):
            while slots[i] is None and queue:  # a prompt may finish at its first token
                refill(i)
        if not queue:
            pack()
        active = [i for i in range(bs) if slots[i] is not None]
        if not active:
            break
        n = active[-1] + 1
        positions = torch.tensor([slots[i].pos if slots[i] else 0 for i in range(n)], device=device)
        kv_len = max(slots[i].pos for i in active) + 1
        logits = llama.decode(last[:n, None], positions, kv_len=kv_len)  # (n, vocab)
        nxt = sample_rows(logits, temps[:n], tops[:n], top_k=d.top_k, generator=llama.generator)
        lps = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0].tolist() if d.logprobs else None
        nxt_host = nxt.tolist()
        for i in active:
            slots[i].pos += 1
            accept(i, nxt_host[i], lps[i] if lps else None)
    return stats
