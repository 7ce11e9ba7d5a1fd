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
        ids = llama.tokenizer.encode(req.prompt, bos=True, eos=False)
        if len(ids) >= max_seq_len:
            msg = (f"has {len(ids)} tokens but max_seq_len is {max_seq_len}, leaving no room to generate; "
                   f"raise --max_seq_len or shorten the prompt")
            if d.strict:
                raise UserError(f"prompt {req.index + 1}: {msg}")
            failed.append(Result(req, error=msg))
        else:
            ready.append((req, ids))
    return ready, failed


def run_static(llama, requests: list[PromptRequest], d: Defaults, on_result: Callable[[Result], None],
               on_progress: Optional[Callable[[Stats], None]] = None,
               on_step: Optional[Callable[[list[int]], None]] = None) -> Stats:
    """Meta's static batching: max_batch_size prompts at a time, each batch run to its longest row."""
    stats = Stats()
    start = time.perf_counter()
    ready, failed = prepare(llama, requests, d)
    for r in failed:
        stats.errors += 1
        on_result(r)
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
