"""Batching against each prompt alone, on random configurations, for as long as asked.

    python scripts/fuzz_batching.py [--seconds 120 | --trials N] [--seed 0] [--device cpu] [--dtype fp32]
                                    [--no_quantize]

Each trial makes a tiny random checkpoint (1-2 layers, 1, 2 or 4 KV heads, fp32 or bf16 weights, kept as they are
or quantized at load to int8/int4), a KV cache of 24-100 positions for 1-5 rows, and 1-12 prompts with random
settings (prompts that begin alike or not, greedy or sampled with top_p/min_p and a seed of their own, max_gen_len
1-200, repetition/frequency/presence penalties, top_k, stop texts; logprobs and echo), some too long for the cache
(error entries), many running into its end (finish_reason max_seq_len). It runs them through the continuous or the
static schedule and then each prompt alone, and reports every prompt whose tokens, finish reason, text or
log-probabilities (by more than 1e-3) differ, unless the two tokens where they part are a near-tie: greedy, within
1e-3 of the logit scale (the tests' rule); sampled, the draw's number within 1e-3 of a boundary of the
distribution's inverse, or the edge of the set top_k/top_p/min_p keep within 1e-3 of moving (penalized prompts:
on the logits as their penalties leave them).
Exits 1 when anything differed. The tests check chosen cases and a fixed 150 of these trials
(test_scheduler.py); this looks further, for the cases nobody chose.
"""

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WORDS = "the cat dog sun moon red blue runs jumps under over hello world 42 and . , !".split()


def trial(rng: random.Random, folder: Path, spm: Path, device: str, stats: Counter, dtype=None,
          quantize: bool = True) -> list[str]:
    """One random configuration; the differences found, as lines. dtype: the model's (default: the build's
    for the device); quantize: False leaves int8/int4 out."""
    import torch

    from helpers import TINY, make_model_folder, near_tie_gap, requests
    from llama_cli import Llama
    from llama_cli.scheduler import Options, run_continuous, run_static

    params = {**TINY, "n_layers": rng.choice([1, 2]), "n_kv_heads": rng.choice([1, 2, 4])}
    stored, form = rng.choice([torch.float32, torch.bfloat16]), rng.choice([None, None, "int8", "int4"])
    form = form if quantize else None
    make_model_folder(folder, spm, params, seed=rng.randrange(1 << 30), dtype=stored)
    max_seq_len, rows = rng.choice([24, 40, 64, 100]), rng.choice([1, 2, 3, 5])
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=max_seq_len,
                        max_batch_size=rows, quantize=form, device=device, dtype=dtype)
    n = rng.randint(1, 12)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_seq_len // 4))) for _ in range(n)]
    if rng.random() < 0.5:  # a shared beginning (the continuous schedule copies its cache: --share_prefixes)
        head = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, max_seq_len // 5)))
        prompts = [head + rng.choice(["", " " + p]) if rng.random() < 0.7 else p for p in prompts]
    reqs = requests(prompts, temperature=[rng.choice([0, 0, 0.7, 1.3]) for _ in range(n)],
                    top_p=[rng.choice([1.0, 0.9]) for _ in range(n)],
                    min_p=[rng.choice([0.0, 0.0, 0.05]) for _ in range(n)],
                    seed=[rng.randrange(1 << 64) for _ in range(n)],  # sampled alone, the same draws
                    max_gen_len=[rng.choice([1, 2, 5, 17, 60, 200]) for _ in range(n)],
                    repetition_penalty=[rng.choice([1.0, 1.0, 1.3, 0.8]) for _ in range(n)],
                    frequency_penalty=[rng.choice([0.0, 0.0, 0.7]) for _ in range(n)],
                    presence_penalty=[rng.choice([0.0, 0.0, -0.5]) for _ in range(n)],
                    top_k=[rng.choice([0, 1, 3]) for _ in range(n)],
                    stop=[tuple(rng.sample(WORDS, rng.choice([0, 0, 1, 2]))) for _ in range(n)])
    schedule = rng.choice(["continuous", "static"])
    opts = Options(logprobs=rng.random() < 0.5, echo=rng.random() < 0.3)
    got = {}
    (run_continuous if schedule == "continuous" else run_static)(
        llama, reqs, opts, lambda r: got.__setitem__(r.request.index, r))
    where = (f"{schedule}, {params['n_layers']} layers, {params['n_kv_heads']} KV heads, {stored} stored, "
             f"quantize {form}, max_seq_len {max_seq_len}, {rows} rows, logprobs {opts.logprobs}, "
             f"echo {opts.echo}")
    found = []
    for r in reqs:
        alone = []
        run_continuous(llama, [r], opts, alone.append)
        a, b = got.get(r.index), alone[0]
        if a is None:
            found.append(f"prompt {r.index} got no result ({where})")
            continue
        stats[a.finish_reason or "error"] += 1
        stats["tokens"] += len(a.tokens)
        if (a.tokens, a.finish_reason, a.generation, a.error) == (b.tokens, b.finish_reason, b.generation, b.error):
            if (a.logprobs is None) == (b.logprobs is None) and all(
                    abs(x - y) <= 1e-3 for x, y in zip(a.logprobs or [], b.logprobs or [])) and \
                    len(a.logprobs or []) == len(b.logprobs or []):
                continue
            found.append(f"prompt {r.index}: log-probabilities differ ({where}):\n  batched {a.logprobs}\n"
                         f"  alone   {b.logprobs}")
            continue
        k = next((i for i, (p, q) in enumerate(zip(a.tokens, b.tokens)) if p != q), None)
        if k is not None:
            prompt = llama.tokenizer.encode(r.prompt, bos=True, eos=False)
            ids = (b.tokens[:k] if opts.echo else prompt + b.tokens[:k])
            with torch.no_grad():
                logits = llama.model(torch.tensor([ids], device=llama.device))[0, -1].float()
            draw = k - (len(prompt) if opts.echo else 0)
            if r.settings.penalized:  # the logits the sampler saw: the prompt's and the draws' tokens penalized
                logits = penalized(logits, r.settings, prompt, ids[len(prompt):])
            if (near_tie_gap(logits, a.tokens[k], b.tokens[k]) if r.settings.greedy
                    else min(draw_margin(logits, r.settings, draw), filter_margin(logits, r.settings))) <= 1e-3:
                stats["near_ties"] += 1
                continue
        found.append(f"prompt {r.index} ({where}; {r.settings}):\n  batched {a.tokens} {a.finish_reason}\n"
                     f"  alone   {b.tokens} {b.finish_reason}")
    return found


def penalized(logits, s, prompt: list, generated: list):
    """`logits` (vocab,) as the sampler penalizes them after `prompt` and the tokens `generated` so far: a
    one-row Sampler keeps the history (set_row, accept) as a run's does, sampling.apply_penalties applies it."""
    import torch

    from llama_cli.sampling import Sampler, apply_penalties

    sampler = Sampler(1, logits.shape[-1], logits.device)
    sampler.set_row(0, s, prompt)
    for t in generated:
        sampler.accept(torch.tensor([t], device=logits.device))
    return apply_penalties(logits[None], sampler.seen, sampler.counts, sampler.repetition, sampler.presence,
                           sampler.frequency)[0]


def draw_margin(logits, s, draw: int) -> float:
    """How near the number of a sampled prompt's draw-th token lies to a boundary of the inverse of the
    distribution the sampler draws from (sampling.py), relative to its total."""
    import torch

    from llama_cli.sampling import filtered_probs, stream_key, uniforms

    probs = torch.softmax(logits / max(s.temperature, 1e-6), -1)[None]
    kept, order = filtered_probs(probs, s.top_p, top_k=s.top_k, min_p=s.min_p)
    cdf = torch.cumsum(torch.zeros_like(kept).scatter_(-1, order, kept)[0], -1)  # in token order, as drawn
    u = uniforms([stream_key(0, 0, s.seed)], [draw])[0]
    return (cdf - u * cdf[-1]).abs().min().item() / cdf[-1].item()


def filter_margin(logits, s) -> float:
    """How near the edge of the set that top_k, top_p and min_p keep (sampling.filtered_probs) lies to moving:
    top_k, the gap between the k-th and the next logit relative to the logit scale (near_tie_gap's rule); top_p,
    the least distance of a token's mass before it from p; min_p, of a probability from min_p times the
    largest, relative to the largest. A tie there lets a batch's rounding keep one token where alone the other
    is kept, which changes the draw however far its number lies from a boundary (found at seed 27, trial
    1718: two logits at the third place equal to 5 digits, top_k 3). inf where no filter is on."""
    import torch

    from helpers import near_tie_gap

    margins = [float("inf")]
    vals, order = torch.sort(logits.float(), descending=True)
    probs = torch.softmax(vals / max(s.temperature, 1e-6), -1)
    vocab = vals.numel()
    if s.top_k and s.top_k < vocab:
        margins.append(near_tie_gap(logits, order[s.top_k - 1].item(), order[s.top_k].item()))
        probs = torch.where(torch.arange(vocab) < s.top_k, probs, 0.0)
        probs = probs / probs.sum()
    if s.top_p < 1.0:
        margins.append((torch.cumsum(probs, -1) - probs - s.top_p)[1:].abs().min().item())
    if s.min_p > 0.0:
        margins.append(((probs - s.min_p * probs[0]) / probs[0])[1:].abs().min().item())
    return min(margins)


def run_trials(one, seconds: float = 120, trials: int = 0, seed: int = 0, spm: Path = None) -> tuple[int, list]:
    """one(rng, folder, spm, n), a trial returning the differences it found as lines, until `seconds` have
    passed (or exactly `trials` times, where given), each printed as found: (trials run, differences). spm: a
    SentencePiece tokenizer (default: trained afresh, as the tests do). scripts/fuzz_processes.py runs its
    trials through this too."""
    from helpers import train_sentencepiece

    found, n = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        spm = spm or train_sentencepiece(Path(tmp) / "tokenizer.model")
        deadline = time.time() + seconds
        while n < trials if trials else time.time() < deadline:
            folder = Path(tmp) / f"m{n}"
            for line in one(random.Random(seed * 1_000_003 + n), folder, spm, n):
                print(f"trial {n}: {line}", flush=True)
                found.append(line)
            shutil.rmtree(folder, ignore_errors=True)  # a long run must not fill the disk, one model a trial
            n += 1
    return n, found


def fuzz(seconds: float = 120, trials: int = 0, seed: int = 0, device: str = "cpu", spm: Path = None,
         dtype=None, quantize: bool = True) -> tuple[int, Counter, list[str]]:
    """run_trials of trial: (trials run, counts, differences); dtype, quantize: as trial's."""
    stats = Counter()
    n, found = run_trials(lambda rng, folder, spm, _: trial(rng, folder, spm, device, stats, dtype, quantize),
                          seconds, trials, seed, spm)
    return n, stats, found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--trials", type=int, default=0, help="run exactly this many trials instead (reproducible)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="the model's dtype (default: the build's for the device; on a "
                    "GPU bf16, whose rounding parts near-ties wider than the 1e-3 rule: pass fp32 there)")
    ap.add_argument("--no_quantize", action="store_true", help="leave int8/int4 out")
    a = ap.parse_args()
    n, stats, found = fuzz(a.seconds, a.trials, a.seed, a.device, dtype=a.dtype, quantize=not a.no_quantize)
    print(f"{n} trials, {stats['tokens']} tokens; finish reasons "
          f"{ {k: v for k, v in stats.items() if k not in ('tokens', 'near_ties')} }; "
          f"{stats['near_ties']} near-ties; {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
