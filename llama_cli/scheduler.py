"""Running many prompt requests through a `Llama`, reporting each result as it finishes.

Two schedules over the same decode engine (engine.py), both reading each prompt's resolved
settings (settings.py) and nothing else:
- `run_static`: Meta's, max_batch_size prompts at a time, each batch run to its longest row
  (`Llama.generate_settings`);
- `run_continuous`: every batch slot holds one prompt at its own cache position and is refilled
  as soon as its prompt ends; slots that free in the same step are prefilled together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .errors import UserError
from .prompts import PromptRequest, Result


@dataclass
class Options:
    """Run-wide choices (the per-prompt ones are in each request's settings)."""
    logprobs: bool = False
    echo: bool = False
    strict: bool = False  # a prompt that cannot run stops the run instead of getting an error entry
    share_prefixes: bool = True  # continuous: a prompt may start from another row's keys and values (SHARED_MIN)


# a prompt whose first SHARED_MIN+ tokens are another live prompt's copies that row's cache for them (on the CPU a
# token's prefill costs ~0.4 ms at the bench's shape; a copy of its keys and values next to nothing)
SHARED_MIN = 16


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens a and b have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Stats:
    prompts: int = 0
    tokens: int = 0
    errors: int = 0
    first_token_s: Optional[float] = None
    cut_by_max_seq_len: int = 0  # prompts that ran into max_seq_len before their max_gen_len
    shared_prompts: int = 0  # prompts that began from another row's cache (--share_prefixes)
    shared_tokens: int = 0  # the prompt tokens those copied instead of computing


def prepare(llama, requests: list[PromptRequest], opts: Options) -> tuple[list, list[Result]]:
    """Tokenise; prompts that leave no room to generate become error results (or fail with --strict)."""
    ready, failed = [], []
    for req in requests:
        if req.messages is not None:
            ids = llama.encode_dialog(req.messages, f"prompt {req.index + 1}")
        else:
            ids = llama.tokenizer.encode(req.prompt, bos=llama.tokenizer.add_bos, eos=False)
        if len(ids) >= llama.max_seq_len:
            msg = (f"has {len(ids)} tokens but max_seq_len is {llama.max_seq_len}, leaving no room to generate; "
                   f"raise --max_seq_len or shorten the prompt")
            if opts.strict:
                raise UserError(f"prompt {req.index + 1}: {msg}")
            failed.append(Result(req, error=msg))
        else:
            ready.append((req, ids))
    return ready, failed


class _Run:
    """What both schedules share: the stats, the clock, and turning an outcome into a Result."""

    def __init__(self, llama, requests, opts, on_result, on_progress, on_step):
        self.llama, self.opts = llama, opts
        self.on_result, self.on_progress, self.on_step = on_result, on_progress, on_step
        self.stats, self.start = Stats(), time.perf_counter()
        self.base = llama.new_base()  # each prompt's draws: this and its index, or its own seed (stream_key)
        self.ready, failed = prepare(llama, requests, opts)
        for r in failed:
            self.stats.errors += 1
            on_result(r)

    def key(self, req: PromptRequest) -> int:
        from .sampling import stream_key

        return stream_key(self.base, req.index, req.settings.seed)

    def first(self) -> None:
        if self.stats.first_token_s is None:
            self.stats.first_token_s = time.perf_counter() - self.start

    def token(self, tokens: list[int]) -> None:
        self.first()
        if self.on_step is not None:
            self.on_step(tokens)

    def report(self, req: PromptRequest, tokens: list[int], logprobs, reason: str, n_generated: int,
               text: Optional[str] = None) -> None:
        self.stats.prompts += 1
        self.stats.tokens += n_generated
        self.stats.cut_by_max_seq_len += reason == "max_seq_len"
        text = self.llama.tokenizer.decode(tokens) if text is None else text
        self.on_result(Result(req, generation=text, tokens=tokens, logprobs=logprobs, finish_reason=reason))
        if self.on_progress is not None:
            self.on_progress(self.stats)


def run_static(llama, requests: list[PromptRequest], opts: Options, on_result: Callable[[Result], None],
               on_progress: Optional[Callable[[Stats], None]] = None,
               on_step: Optional[Callable[[list[int]], None]] = None) -> Stats:
    """Meta's static batching: max_batch_size prompts at a time, each batch run to its longest row."""
    run = _Run(llama, requests, opts, on_result, on_progress, on_step)
    bs = llama.max_batch_size
    for i in range(0, len(run.ready), bs):
        batch = run.ready[i:i + bs]
        # every step's tokens on the host only for a caller that wants them (streaming): on a GPU that read
        # waits for the step, and the next one is launched only after it
        outs = llama.generate_settings([ids for _, ids in batch], [r.settings for r, _ in batch],
                                       logprobs=opts.logprobs, echo=opts.echo,
                                       on_step=run.token if run.on_step is not None else None, on_first=run.first,
                                       keys=[run.key(r) for r, _ in batch])
        for (req, ids), g in zip(batch, outs):
            run.report(req, g.tokens, g.logprobs, g.finish_reason, len(g.tokens) - (len(ids) if opts.echo else 0),
                       g.text)
    return run.stats


@dataclass
class _Slot:
    request: PromptRequest
    ids: list  # prompt token ids
    pos: int  # cache position the next fed token is written to
    generated: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    watcher: object = None  # a StopText when the prompt has stop texts


def run_continuous(llama, requests: list[PromptRequest], opts: Options, on_result: Callable[[Result], None],
                   on_progress: Optional[Callable[[Stats], None]] = None,
                   on_step: Optional[Callable[[list[int]], None]] = None) -> Stats:
    """Continuous batching: each of max_batch_size slots holds one prompt at its own cache
    position; a slot whose prompt ends (stop token or text, its max_gen_len, or the end of the
    cache) is refilled with the next prompt at once, so no slot idles while others run on.
    Results are reported as they finish (callers restore input order)."""
    run = _Run(llama, requests, opts, on_result, on_progress, on_step)
    return _Continuous(llama, run, opts).run()


def tail_longest_first(ready: list, window: int, max_seq_len: int) -> list:
    """The (request, ids) list with its last `window` prompts reordered by how many tokens each may generate
    (its max_gen_len, or the room the cache leaves), most first, ties in input order. Started in input order,
    a long prompt near the end runs on alone while the other slots stay empty; started first, it runs
    beside the short ones. For the batching bench's 64 prompts at batch 16 this takes the continuous
    schedule from 665 steps to 571 (simulated; 529 if every step were full); only the last prompts start
    later than their turn."""
    def room(item):
        req, ids = item
        return min(req.settings.max_gen_len, max_seq_len - len(ids))

    cut = max(0, len(ready) - window)
    return ready[:cut] + sorted(ready[cut:], key=room, reverse=True)


# Whether the continuous schedule launches each decode step before reading back the tokens of the step before
# it (None: where the device runs asynchronously to the host, CUDA). Reading a step's tokens waits for the
# GPU, and the host's work after it (stop checks, results, the next launch) then leaves the GPU idle: on an
# H100 ~1-3 ms a step against 5-9 ms of GPU time (docs/benchmarks.md). Launched ahead, a step runs while the
# host settles the one before; a row that the earlier token ends gets one wasted token, dropped. On the CPU
# steps run as they are launched, so nothing would overlap (the tests force it on to check the logic).
AHEAD: Optional[bool] = None


@dataclass
class _Step:
    """A launched decode step: the live rows it ran for (row index, slot) and its tokens (n,), with their
    log-probabilities when asked, on the host once `ready` (an event; None: already there)."""
    rows: list
    tokens: object
    logprobs: object
    ready: object = None

    def host(self) -> tuple[list, Optional[list]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist(), None if self.logprobs is None else self.logprobs.tolist()


class _Continuous:
    """The continuous schedule's state: the slots, the prompts still to start, each slot's next token,
    and the sampler; run() refills free slots and steps the live ones until every prompt is done."""

    def __init__(self, llama, run: _Run, opts: Options):
        import torch

        from .devices import is_cuda
        from .sampling import Sampler

        self.llama, self.job, self.opts = llama, run, opts
        self.engine = llama.engine
        self.bs, self.max_seq_len = self.engine.max_batch_size, self.engine.max_seq_len
        self.stop_ids = llama.tokenizer.stop_ids
        self.slots: list[Optional[_Slot]] = [None] * self.bs
        # pop() takes the next prompt: in input order, but the last ones longest first (tail_longest_first)
        self.queue = list(reversed(tail_longest_first(run.ready, 2 * self.bs, self.max_seq_len)))
        self.last = torch.zeros(self.bs, dtype=torch.long, device=llama.device)  # each slot's next fed token
        self.sampler = Sampler(self.bs, llama.model.params.vocab_size, llama.device, llama.generator)
        self.cuda = is_cuda(llama.device)
        self.ahead = self.cuda if AHEAD is None else AHEAD

    def run(self) -> Stats:
        slots, flight = self.slots, None  # flight: the step launched and not yet settled
        while True:
            free = [i for i in range(self.bs) if slots[i] is None]
            if free and self.queue:
                self.refill(free)
                continue  # a prompt may end at its first token: fill again before decoding
            if flight is None:
                self.pack()
            # with holes to pack (no prompts left to fill them) the step in flight settles first
            holes = flight is not None and any(slots[i] is None for i in range(self.last_live() + 1))
            step = None if holes else self.launch(flight)
            if flight is None and step is None:
                break
            if flight is not None:
                self.settle(flight)
            flight = step
            if flight is not None and not self.ahead:
                self.settle(flight)
                flight = None
        return self.job.stats

    def last_live(self) -> int:
        return max((i for i in range(self.bs) if self.slots[i] is not None), default=-1)

    def launch(self, flight: Optional[_Step]) -> Optional[_Step]:
        """Run one decode step for the live rows (rows 0..n-1, free ones in between fed anything), each at
        its next position: one further where `flight`, launched before, holds its token still unread."""
        import torch

        slots = self.slots
        active = [i for i in range(self.bs) if slots[i] is not None]
        if not active:
            return None
        ahead = {i for i, s in flight.rows if slots[i] is s} if flight is not None else set()
        n = active[-1] + 1
        positions = [0] * n
        for i in active:
            positions[i] = slots[i].pos + (i in ahead)
        logits = self.engine.decode(self.last[:n], positions)
        # a fed token at position q is its prompt's (q - prompt length)-th generated: this step draws the next
        draws = [positions[i] - len(slots[i].ids) + 1 if slots[i] is not None else 0 for i in range(n)]
        nxt = self.sampler.sample(logits, draws=draws)  # (n,)
        self.sampler.accept(nxt)
        self.last[:n] = nxt  # on the device: the next step's input without a trip through the host
        lps = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0] if self.opts.logprobs else None
        step = _Step([(i, slots[i]) for i in active], nxt, lps)
        if self.cuda:  # copied into pinned memory behind this step, read once it is there
            step.tokens = torch.empty(nxt.shape, dtype=nxt.dtype, pin_memory=True).copy_(nxt, non_blocking=True)
            if lps is not None:
                step.logprobs = torch.empty(lps.shape, dtype=lps.dtype, pin_memory=True).copy_(lps, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        return step

    def settle(self, step: _Step) -> None:
        """Take a launched step's tokens into its rows, except rows whose prompt has ended since."""
        tokens, lps = step.host()
        for i, slot in step.rows:
            if self.slots[i] is slot:
                slot.pos += 1
                self.accept(i, tokens[i], lps[i] if lps else None)

    def finish(self, i: int, reason: str) -> None:
        s, echo = self.slots[i], self.opts.echo
        self.slots[i] = None
        tokens = s.ids + s.generated if echo else s.generated
        text = None
        if s.watcher is not None and s.watcher.stopped:
            text = (self.llama.tokenizer.decode(s.ids) if echo else "") + s.watcher.text
        self.job.report(s.request, tokens, s.logprobs if self.opts.logprobs else None, reason, len(s.generated), text)

    def accept(self, i: int, token: int, logprob: Optional[float]) -> None:
        """Record slot i's next token; finish the slot if that ends it."""
        s = self.slots[i]
        self.job.token([token])
        if token in self.stop_ids:
            return self.finish(i, "stop")
        s.generated.append(token)
        if self.opts.logprobs:
            s.logprobs.append(logprob)
        if s.watcher is not None and s.watcher.update(s.generated):
            return self.finish(i, "stop")
        # s.pos is where this token goes in the cache; stop when no room is left for the next one
        if len(s.generated) >= s.request.settings.max_gen_len:
            return self.finish(i, "length")
        if s.pos + 1 >= self.max_seq_len:
            return self.finish(i, "max_seq_len")

    def refill(self, free: list[int]) -> None:
        """Start the next prompts in the free slots, their prompts prefilled together."""
        import torch
        import torch.nn.functional as F

        from .stopping import StopText

        take = [(i, *self.queue.pop()) for i in free[:len(self.queue)]]
        rows, ids = [i for i, _, _ in take], [p for _, _, p in take]
        starts = self.shared_starts(take)
        for i, req, p in take:
            watcher = StopText(self.llama.tokenizer, req.settings.stop) if req.settings.stop else None
            self.slots[i] = _Slot(req, p, pos=len(p), watcher=watcher)
            self.sampler.set_row(i, req.settings, p, self.job.key(req))
        if self.opts.echo and self.opts.logprobs:  # log-probabilities of the prompts' own tokens too
            per_row = self.engine.prefill(rows, ids, all_logits=True)
            for (i, _, p), lg in zip(take, per_row):
                pt = torch.as_tensor(p, device=lg.device)
                self.slots[i].logprobs = [0.0] + (-F.cross_entropy(lg[:-1], pt[1:], reduction="none")).tolist()
            logits = torch.stack([lg[-1] for lg in per_row])
        else:
            logits = self.prefill(rows, ids, starts)
        tok = self.sampler.sample(logits, rows=rows, draws=[0] * len(rows))
        rows_t = torch.as_tensor(rows, device=self.llama.device)
        self.sampler.accept(tok, rows=rows_t)
        self.last[rows_t] = tok
        lps = torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0].tolist() if self.opts.logprobs else None
        for k, (i, t) in enumerate(zip(rows, tok.tolist())):
            self.accept(i, t, lps[k] if lps else None)

    def shared_starts(self, take: list) -> dict[int, tuple[int, int]]:
        """The new prompts that begin as a prompt already in the batch does, by SHARED_MIN+ tokens: slot ->
        (the row holding that prompt, tokens shared), at least one token of its own left to prefill. The rows are
        live ones (a free row's cache is overwritten by the steps that feed it) and this refill's prompts that
        start afresh (prefilled first). Identical on every rank (decided from the tokens alone)."""
        if not (self.opts.share_prefixes and self.engine.shares_prefixes) or (self.opts.echo and self.opts.logprobs):
            return {}
        sources = [(j, s.ids) for j, s in enumerate(self.slots) if s is not None]
        starts = {}
        for i, _, p in take:
            n, src = max(((shared_prefix(p, q), j) for j, q in sources), default=(0, -1))
            n = min(n, len(p) - 1)
            if n >= SHARED_MIN:
                starts[i] = (src, n)
            else:
                sources.append((i, p))
        return starts

    def prefill(self, rows: list, ids: list, starts: dict[int, tuple[int, int]]):
        """Prefill the new prompts ids into rows, those in `starts` after copying their shared beginnings: the
        logits of each one's last token (n, vocab), in rows' order."""
        import torch

        if not starts:
            return self.engine.prefill(rows, ids)
        out = {}
        fresh = [(i, p) for i, p in zip(rows, ids) if i not in starts]
        if fresh:
            fresh_rows, fresh_ids = (list(x) for x in zip(*fresh))
            out.update(zip(fresh_rows, self.engine.prefill(fresh_rows, fresh_ids)))
        shared = [(i, p) for i, p in zip(rows, ids) if i in starts]
        shared_rows, firsts = [i for i, _ in shared], [starts[i] for i, _ in shared]
        out.update(zip(shared_rows, self.engine.prefill_after(shared_rows, firsts,
                                                              [p[n:] for (_, p), (_, n) in zip(shared, firsts)])))
        self.job.stats.shared_prompts += len(shared)
        self.job.stats.shared_tokens += sum(n for _, n in firsts)
        return torch.stack([out[i] for i in rows])

    def pack(self) -> None:
        """Once no prompts are left to start, move live slots down into free ones, so each step
        runs only over rows 0..n-1."""
        slots = self.slots
        for i in range(self.bs):
            if slots[i] is None:
                j = max((k for k in range(i + 1, self.bs) if slots[k] is not None), default=None)
                if j is None:
                    return
                self.engine.move_row(j, i)
                self.sampler.move_row(j, i)
                slots[i], slots[j] = slots[j], None
                self.last[i] = self.last[j]
