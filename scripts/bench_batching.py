"""Continuous vs static batching on a prompt file: tokens/s side by side, in one run.

    python scripts/bench_batching.py [--prompts 256] [--batch 16] [--dim 512 --n_layers 8] [--device cpu]
                                     [--input_order] [--settled] [--rounds N] [--where]

Makes a random checkpoint (or uses --ckpt_dir) and a JSONL file of --prompts prompts with mixed
lengths (4-200 tokens) and mixed max_gen_len (8-256), then runs both schedules greedily at the same
max_batch_size and prints generated tokens/s for each, their ratio, how many prompts gave the
same tokens in both modes, and the arithmetic each schedule did (GFLOP of matrix products and attention,
counted from the engine's calls: their ratio is what the tokens/s ratio would be where a step costs its
arithmetic, as on a CPU).
"""

import argparse
import dataclasses
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_requests(llama, n_prompts: int, seed: int = 0, prefix: int = 0):
    """n_prompts prompts of 4-200 tokens (built from token ids so lengths are exact), max_gen_len 8-256; with
    prefix, each after the same `prefix` tokens (a shared instruction), the rest as without."""
    from llama_cli.prompts import PromptRequest
    from llama_cli.settings import Settings

    rng = random.Random(seed)
    vocab = llama.tokenizer.n_words
    head = [random.Random(seed + 1).randrange(3, vocab) for _ in range(prefix)]
    reqs = []
    for i in range(n_prompts):
        n = rng.randint(4, 200)
        text = llama.tokenizer.decode(head + [rng.randrange(3, vocab) for _ in range(n)])
        while len(llama.tokenizer.encode(text, bos=True, eos=False)) > 200 + prefix:
            text = text[:-1]
        reqs.append(PromptRequest(i, text, Settings(max_gen_len=rng.randint(8, 256), temperature=0.0)))
    return reqs


def breakdown(llama, run) -> dict:
    """Where one run's time goes: seconds in the engine's decode steps and prefills (the device synchronized
    after each, so a step's device time counts as the step's) and in everything else (the scheduler, sampling,
    stop checks, reading tokens back: host time a GPU would idle through). run: a callable doing the run."""
    import torch

    eng, spent = llama.engine, {"decode_s": 0.0, "prefill_s": 0.0}
    real = {"decode": eng.decode, "prefill": eng.prefill, "prefill_after": eng.prefill_after}

    def timed(name):
        def call(*a, **k):
            start = time.perf_counter()
            out = real[name](*a, **k)
            if llama.device.type != "cpu":
                torch.accelerator.synchronize()
            spent["decode_s" if name == "decode" else "prefill_s"] += time.perf_counter() - start
            return out
        return call

    eng.decode, eng.prefill, eng.prefill_after = timed("decode"), timed("prefill"), timed("prefill_after")
    try:
        start = time.perf_counter()
        run()
        if llama.device.type != "cpu":
            torch.accelerator.synchronize()
        total = time.perf_counter() - start
    finally:
        eng.decode, eng.prefill, eng.prefill_after = real["decode"], real["prefill"], real["prefill_after"]
    return {**spent, "other_s": total - spent["decode_s"] - spent["prefill_s"], "total_s": total}


class Work:
    """Counts what one run's engine calls compute, to turn into arithmetic (deterministic, unlike timings):
    decode rows and the cache positions they attend over, prefill tokens (as the eager prefill runs them: packed
    where the engine packs prompts of different lengths, else every prompt padded to the call's longest) and the
    causal pairs among them, prompts (one output-layer row each). Prefill graphs (CUDA) pad further, uncounted."""

    def __init__(self, eng):
        self.eng, self.real = eng, (eng.decode, eng.prefill, eng.prefill_after)
        self.decode_rows = self.attended = self.prefill_tokens = self.prefill_pairs = self.prompts = 0

    def __enter__(self):
        decode, prefill, prefill_after = self.real

        def counted_decode(tokens, positions):
            self.decode_rows += len(positions)
            self.attended += sum(p + 1 for p in positions)
            return decode(tokens, positions)

        def counted_prefill(rows, prompts, all_logits=False):
            lengths = [len(p) for p in prompts]
            if not (self.eng.pack_prefills and len(set(lengths)) > 1 and not all_logits):
                lengths = [max(lengths)] * len(lengths)  # padded to the longest
            self.prompts += len(prompts)
            self.prefill_tokens += sum(lengths)
            self.prefill_pairs += sum(n * (n + 1) // 2 for n in lengths)
            return prefill(rows, prompts, all_logits)

        def counted_prefill_after(rows, starts, prompts):  # packed, each after its shared beginning
            self.prompts += len(prompts)
            self.prefill_tokens += sum(len(p) for p in prompts)
            self.prefill_pairs += sum(len(p) * (len(p) + 1) // 2 + len(p) * n for p, (_, n) in zip(prompts, starts))
            return prefill_after(rows, starts, prompts)

        self.eng.decode, self.eng.prefill = counted_decode, counted_prefill
        self.eng.prefill_after = counted_prefill_after
        return self

    def __exit__(self, *exc):
        self.eng.decode, self.eng.prefill, self.eng.prefill_after = self.real

    def gflop(self, args) -> dict:
        """GFLOP of the matrix products (a multiply-add counted as 2) and of attention (scores and the weighted
        sum of values: 4 x the query width per position attended), for the model's ModelArgs."""
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        layer = args.dim * (2 * q + 2 * kv) + 3 * args.dim * args.hidden_dim  # wq, wo, wk, wv, w1, w2, w3
        body, head, attn = 2 * layer * args.n_layers, 2 * args.vocab_size * args.dim, 4 * q * args.n_layers
        products = (self.decode_rows + self.prefill_tokens) * body + (self.decode_rows + self.prompts) * head
        attention = (self.attended + self.prefill_pairs) * attn
        decode = self.decode_rows * (body + head) + self.attended * attn
        return {"decode_gflop": decode / 1e9, "prefill_gflop": (products + attention - decode) / 1e9,
                "products_gflop": products / 1e9, "attention_gflop": attention / 1e9,
                "gflop": (products + attention) / 1e9, "decode_rows": self.decode_rows,
                "prefill_tokens": self.prefill_tokens}


def compare(llama, n_prompts: int = 256, seed: int = 0, keep: bool = False, input_order: bool = False,
            rounds: int = 1, where: bool = False, settled: bool = False, shared_prefix: int = 0) -> dict:
    """Both schedules on the same prompts, side by side; the stop token is masked so every prompt runs to
    its own max_gen_len in both. keep: the result holds the requests and both schedules' tokens too.
    input_order: the continuous schedule also with its prompts started strictly in input order (without
    scheduler.tail_longest_first), as "continuous_input_order". rounds: each schedule that many times,
    interleaved, the median time counted. Also the decode steps and prefill calls each schedule made.
    where: then one more, untimed run of each schedule with breakdown() (as "<schedule>_where").
    settled: the continuous schedule also settling each step before launching the next (scheduler.AHEAD off,
    as on the CPU; on by default on CUDA), as "continuous_settled". shared_prefix: every prompt after the same
    this many tokens, and the continuous schedule also computing each prompt whole ("continuous_unshared")."""
    import statistics

    import torch

    import llama_cli.scheduler as scheduler
    from llama_cli.scheduler import Options, run_continuous, run_static

    def continuous_with(name, value):  # the continuous schedule with one of scheduler's settings changed
        def run(*a, **k):
            saved = getattr(scheduler, name)
            setattr(scheduler, name, value)
            try:
                return run_continuous(*a, **k)
            finally:
                setattr(scheduler, name, saved)
        return run

    reqs = make_requests(llama, n_prompts, seed, shared_prefix)
    stop, stop_t = llama.tokenizer.stop_ids, llama._stop
    llama.tokenizer.stop_ids = frozenset()
    llama._stop = torch.tensor([-1], device=llama.device)
    runs = [("static", run_static), ("continuous", run_continuous)]
    if input_order:
        runs.append(("continuous_input_order",
                     continuous_with("tail_longest_first", lambda ready, window, max_seq_len: ready)))
    if settled:
        runs.append(("continuous_settled", continuous_with("AHEAD", False)))
    if shared_prefix:
        runs.append(("continuous_unshared", lambda llama, reqs, opts, *a, **k:
                     run_continuous(llama, reqs, dataclasses.replace(opts, share_prefixes=False), *a, **k)))
    secs, outs, tokens, steps, where_runs, work = {}, {}, {}, {}, {}, {}
    eng = llama.engine
    try:
        for _ in range(rounds):
            for name, fn in runs:
                out = {}
                warm0, steps0, prefills0 = eng.warmup_s, eng.steps, eng.prefills
                start = time.perf_counter()
                with Work(eng) as counted:
                    stats = fn(llama, reqs, Options(), lambda r: out.__setitem__(r.request.index, r.tokens))
                work[name] = counted.gflop(llama.model.params)
                if llama.device.type != "cpu":
                    torch.accelerator.synchronize()
                # graph capture excluded
                secs.setdefault(name, []).append(time.perf_counter() - start - (eng.warmup_s - warm0))
                outs.setdefault(name, out)
                tokens[name] = stats.tokens
                steps[name] = (eng.steps - steps0, eng.prefills - prefills0)
        for name, fn in runs if where else ():
            where_runs[name] = breakdown(llama, lambda: fn(llama, reqs, Options(), lambda r: None))
    finally:
        llama.tokenizer.stop_ids, llama._stop = stop, stop_t
    same = sum(outs["static"][i] == outs["continuous"][i] for i in range(len(reqs)))
    t = {k: statistics.median(v) for k, v in secs.items()}
    rate = {k: tokens[k] / t[k] for k in t}
    res = {"prompts": len(reqs), "tokens": tokens["static"], "rounds": rounds, "identical": same,
           "ratio": rate["continuous"] / rate["static"]}
    res.update({f"{name}_where": w for name, w in where_runs.items()})
    for name, _ in runs:
        res.update({f"{name}_s": t[name], f"{name}_tok_s": rate[name], f"{name}_steps": steps[name][0],
                    f"{name}_prefills": steps[name][1], f"{name}_all_s": secs[name], f"{name}_work": work[name]})
    if keep:
        res.update(requests=reqs, static_out=outs["static"], continuous_out=outs["continuous"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=None)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n_layers", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input_order", action="store_true",
                    help="also time the continuous schedule starting prompts strictly in input order")
    ap.add_argument("--rounds", type=int, default=1, help="run each schedule this many times, interleaved; "
                    "the median time counts")
    ap.add_argument("--settled", action="store_true", help="also time the continuous schedule reading each "
                    "step's tokens before launching the next (on CUDA it launches ahead; on the CPU the two are one)")
    ap.add_argument("--shared_prefix", type=int, default=0, help="every prompt after the same N tokens (a shared "
                    "instruction); the continuous schedule also timed without sharing them (--noshare_prefixes)")
    ap.add_argument("--where", action="store_true", help="then run each schedule once more, untimed, and print "
                    "where its time goes: decode steps, prefills, everything else (host work)")
    a = ap.parse_args()

    import torch

    from llama_cli import Llama
    from llama_cli.tokenizer import find_tokenizer

    ckpt = a.ckpt_dir
    if ckpt is None:
        ckpt = f"/tmp/llama-cli-bench-{a.dim}x{a.n_layers}"
        if not os.path.exists(os.path.join(ckpt, "params.json")):
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), "--out", ckpt,
                            "--dim", str(a.dim), "--n_layers", str(a.n_layers), "--n_heads", "8", "--n_kv_heads", "4",
                            "--dtype", "fp32"], check=True)
    llama = Llama.build(ckpt, find_tokenizer(ckpt), max_seq_len=200 + 256 + a.shared_prefix, max_batch_size=a.batch,
                        device=a.device, dtype=a.dtype)
    res = compare(llama, a.prompts, a.seed, input_order=a.input_order, rounds=a.rounds, where=a.where,
                  settled=a.settled, shared_prefix=a.shared_prefix)
    extra = (("continuous_input_order",) if a.input_order else ()) + (("continuous_settled",) if a.settled else ()) \
        + (("continuous_unshared",) if a.shared_prefix else ())
    dev = f"{llama.device} ({torch.cuda.get_device_name() if llama.device.type == 'cuda' else os.cpu_count()} " \
          f"{'GPU' if llama.device.type == 'cuda' else 'cores'})"
    print(f"model dim={llama.model.params.dim} n_layers={llama.model.params.n_layers} "
          f"{str(llama.model.norm.weight.dtype).replace('torch.', '')} on {dev}; {res['prompts']} prompts "
          f"({f'{a.shared_prefix} shared tokens, then ' if a.shared_prefix else ''}4-200 tokens), max_gen_len 8-256, "
          f"max_batch_size {a.batch}, greedy\n")
    names = ("static", "continuous") + extra
    table(["schedule", "generated tokens", "decode steps", "prefill calls", "seconds" + " (median)" * (a.rounds > 1),
           "tokens/s"],
          [[res["tokens"], res[n + "_steps"], res[n + "_prefills"], f"{res[n + '_s']:.1f}", f"{res[n + '_tok_s']:.1f}"]
           for n in names], names)
    print(f"\ncontinuous / static: {res['ratio']:.2f}x; identical outputs: {res['identical']}/{res['prompts']} prompts")
    print("\nThe arithmetic each schedule did (matrix products and attention; prompt tokens as the eager prefill "
          "runs them):\n")
    table(["schedule", "decode rows", "prefill tokens", "GFLOP decode", "GFLOP prefill", "GFLOP", "GFLOP/s"],
          [[w["decode_rows"], w["prefill_tokens"], f"{w['decode_gflop']:.0f}", f"{w['prefill_gflop']:.0f}",
            f"{w['gflop']:.0f}", f"{w['gflop'] / res[n + '_s']:.1f}"] for n in names for w in [res[n + "_work"]]],
          names)
    bound = res["static_work"]["gflop"] / res["continuous_work"]["gflop"]
    print(f"\nstatic / continuous arithmetic: {bound:.2f}x (where a step's cost follows its arithmetic, as on a "
          "CPU, the tokens/s ratio at equal GFLOP/s)")
    if a.where:
        print("\nWhere the time goes (one more run of each, the device synchronized after each engine call):\n")
        table(["schedule", "decode steps s", "prefills s", "everything else s", "total s"],
              [[f"{w[k]:.2f}" for k in ("decode_s", "prefill_s", "other_s", "total_s")]
               for n in names for w in [res[n + "_where"]]], names)


def table(header: list, rows: list, names) -> None:
    """A markdown table: one row per schedule (its name first, underscores as spaces)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in zip(names, rows):
        print("| " + " | ".join([name.replace("_", " ")] + [str(c) for c in row]) + " |")


if __name__ == "__main__":
    main()
