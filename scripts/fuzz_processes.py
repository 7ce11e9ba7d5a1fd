"""One process against several (torchrun, gloo on the CPU), on random checkpoints, for as long as asked.

    python scripts/fuzz_processes.py [--seconds 300 | --trials N] [--seed 0]

Each trial makes a tiny random checkpoint (dim 64 or 128, 1-2 layers, 2-8 heads, 1 to all of them KV heads,
fp32 or bf16, in 1, 2 or 4 shards) and a JSONL prompt file (its prompts sometimes after one shared beginning),
then runs the same `llama-cli` command (greedy or sampled at a fixed seed, continuous or static, dense or
quantized at load, an fp32 or bf16 KV cache; or, one trial in four, `llama-cli chat` with the prompts piped as
messages) in one process and under torchrun on 2 or 4, and compares the tokens. A configuration the processes
cannot split must be refused with llama-cli's one-line error (torchrun then exits 1); anything else that differs
is printed. Exits 1 when anything differed. (Found: a KV head split over shards read from one shard only; int8
row scales taken over one process's columns. Found by hand, then added here: chat's ranks each reading standard
input.)
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WORDS = "the cat dog sun moon red blue runs 42 , .".split()


def trial(rng: random.Random, folder: Path, spm: Path, port: int) -> list[str]:
    """One random configuration; the differences found, as lines."""
    import torch

    from helpers import TINY, make_model_folder, subprocess_env

    heads = rng.choice([2, 4, 8])
    params = {**TINY, "dim": rng.choice([64, 128]), "n_heads": heads, "n_layers": rng.choice([1, 2]),
              "n_kv_heads": rng.choice([h for h in (1, 2, 4, 8) if heads % h == 0])}
    shards = rng.choice([1, 2, 4])
    make_model_folder(folder, spm, params, n_shards=shards, seed=rng.randrange(1 << 30),
                      dtype=rng.choice([torch.float32, torch.bfloat16]))
    prompts = folder / "prompts.jsonl"
    head = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + " " if rng.random() < 0.3 else ""
    texts = [head + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 9))]
    prompts.write_text("".join(json.dumps({"prompt": t, "max_gen_len": rng.choice([1, 5, 20, 60])}) + "\n"
                               for t in texts))
    common = ["--output", "jsonl", "--quiet", "--temperature", rng.choice([0, 0, 0.8]), "--seed", rng.randrange(100),
              "--max_seq_len", rng.choice([48, 96]),
              *rng.choice([[], [], ["--quantize", "int8"], ["--quantize", "int4"],
                           ["--quantize", "int8", "--group_size", "32"]]),
              *rng.choice([[], [], ["--kv_cache_dtype", "bf16"]])]
    if rng.random() < 0.25:  # chat: rank 0 reads the messages (piped, a blank line among them) and hands them on
        args, stdin = ["chat", "--ckpt_dir", folder, *common, "--max_gen_len", rng.choice([1, 5, 20, 60])], \
            "\n".join(texts[:1] + [""] + texts[1:]) + "\n"
    else:
        args, stdin = ["--ckpt_dir", folder, "--prompts_file", prompts, *common, "--schedule",
                       rng.choice(["continuous", "static"]), "--max_batch_size", rng.choice([1, 3, 4])], ""
    args = [str(a) for a in args]
    procs = rng.choice([2, 2, 4])
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "llama_cli", *args], input=stdin, capture_output=True, text=True,
                         env=env)
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                           f"--master_port={port}", "-m", "llama_cli", *args],
                          input=stdin, capture_output=True, text=True, env=env)
    where = f"{params}, {shards} shard(s), {procs} processes, {' '.join(a for a in args if a != str(folder))}"
    refused = [line for line in many.stderr.splitlines() if line.startswith("llama-cli: error:")]
    if one.returncode in (0, 1) and many.returncode != 0 and refused and not many.stdout:
        return []  # a split the processes cannot make, refused in one line (one process may have error entries: 1)
    if one.returncode != many.returncode:
        last = [(p.stderr.strip().splitlines() or [""])[-1] for p in (one, many)]
        return [f"exit {one.returncode} on one process, {many.returncode} on {procs} ({where}):\n  {last[0]}\n"
                f"  {last[1]}"]
    alone = [json.loads(line).get("tokens") for line in one.stdout.splitlines()]
    split = [json.loads(line).get("tokens") for line in many.stdout.splitlines()]
    if len(alone) != len(split):
        return [f"{len(alone)} results on one process, {len(split)} on {procs} ({where})"]
    if alone != split:
        return [f"{sum(a != b for a, b in zip(alone, split))} of {len(alone)} prompts differ ({where})"]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--trials", type=int, default=0, help="run exactly this many trials instead (reproducible)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from fuzz_batching import run_trials

    n, found = run_trials(lambda rng, folder, spm, i: trial(rng, folder, spm, 29500 + i % 400), a.seconds,
                          a.trials, a.seed)
    print(f"{n} trials; {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
