"""Decoding while other work keeps the CPUs busy: the default thread count (PyTorch's, lowered and raised by
the thread governor, llama_cli/cpu_share.py) against fixed --threads counts, as separate llama-cli runs.

    python scripts/bench_threads.py --ckpt_dir checkpoints/smollm2-135m [--rounds 3] [--max_gen_len 256]
        [--prompts N | --prompts_file F] [--max_batch_size 16] [--only idle,busy,together,lanes]

Three situations, the commands of each taking turns round by round (medians; each run's closing line):
  idle      one run alone on an idle machine;
  busy      one run beside --busy processes that each keep a CPU busy (`while True: pass`; default: half the
            CPUs, at least one);
  together  --together runs of the same command started at once (default 2), each run's rate;
  lanes     a script's `xargs -P`: --together lanes at once, each running --jobs runs one after another (the
            first runs start together, the later ones whenever their lane's last ends); the figure is every
            token generated over the whole thing's wall time (process starts and loads included).
Rows: the default (no --threads), --threads with every CPU (the count fixed: what the default did before the
governor), and --threads with the CPUs left per run (busy: CPUs - busy; together: CPUs / together).
With --prompts_file (or --prompts N: N made-up prompts of 3-40 words) the runs decode that file (continuous
batching, --max_batch_size rows) and the figure is the generation rate over all its prompts.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RATE = re.compile(r"([0-9]+) tokens in [0-9.]+ s: ([0-9.]+) tokens/s generating; first token after ([0-9.]+) s")


def command(a, threads):
    cmd = [sys.executable, "-m", "llama_cli", "--ckpt_dir", a.ckpt_dir, "--max_gen_len", str(a.max_gen_len),
           "--temperature", "0"]
    if a.prompts_file:
        cmd += ["--prompts_file", a.prompts_file, "--max_batch_size", str(a.max_batch_size)]
    else:
        cmd += ["--prompt", "The three primary colors are"]
    return cmd + (["--threads", str(threads)] if threads else [])


def run_at_once(cmds):
    """Start every command at once; each one's (tokens/s, first token s, tokens)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for c in cmds]
    out = []
    for p in procs:
        err = p.communicate()[1]
        m = RATE.search(err)
        if p.returncode or not m:
            sys.exit(f"bench_threads: a run failed:\n{err[-2000:]}")
        out.append((float(m.group(2)), float(m.group(3)), int(m.group(1))))
    return out


def lanes(cmd, n: int, jobs: int):
    """n lanes of `jobs` runs each: [(all tokens generated / wall seconds, the runs' median first token s)]."""
    import threading

    got = []

    def lane():
        for _ in range(jobs):
            got.extend(run_at_once([cmd]))

    t = time.perf_counter()
    threads = [threading.Thread(target=lane) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if len(got) != n * jobs:
        sys.exit("bench_threads: a lane's run failed")
    return [(sum(g[2] for g in got) / wall, statistics.median(g[1] for g in got))]


def write_prompts(n: int) -> str:
    import random
    import tempfile

    rng = random.Random(1)
    words = "the a cat dog sky river city music light tree house ran sat over under blue green old new".split()
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    with f:
        for _ in range(n):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + "\n")
    return f.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max_gen_len", type=int, default=256)
    ap.add_argument("--prompts_file")
    ap.add_argument("--prompts", type=int, default=0, help="decode N made-up prompts (a file written for the run)")
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--busy", type=int, default=0, help="busy processes (default: half the CPUs, at least 1)")
    ap.add_argument("--together", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=3, help="runs in each lane (lanes)")
    ap.add_argument("--only", help="situations to run, comma-separated (default: all)")
    a = ap.parse_args()
    if a.prompts:
        a.prompts_file = write_prompts(a.prompts)
    from llama_cli.devices import usable_cpus

    cpus = usable_cpus()
    busy = a.busy or max(1, cpus // 2)
    rows = {"idle": [("default", None), (f"--threads {cpus}", cpus)],
            "busy": [("default", None), (f"--threads {cpus}", cpus), (f"--threads {max(1, cpus - busy)}",
                                                                     max(1, cpus - busy))],
            "together": [("default", None), (f"--threads {cpus}", cpus),
                         (f"--threads {max(1, cpus // a.together)}", max(1, cpus // a.together))]}
    rows["lanes"] = rows["together"]
    if a.only:
        rows = {k: v for k, v in rows.items() if k in a.only.split(",")}
    got = {(s, name): [] for s, rs in rows.items() for name, _ in rs}
    for r in range(a.rounds):
        for situation, variants in rows.items():
            for name, threads in variants:
                hogs = []
                if situation == "busy":
                    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
                    time.sleep(0.5)
                try:
                    if situation == "lanes":
                        got[situation, name] += lanes(command(a, threads), a.together, a.jobs)
                    else:
                        n = a.together if situation == "together" else 1
                        got[situation, name] += run_at_once([command(a, threads)] * n)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
        print(f"round {r + 1} of {a.rounds} done", file=sys.stderr)
    what = "one prompt"
    if a.prompts_file:
        what = f"{a.prompts or 'the'} prompts of {a.prompts_file} at --max_batch_size {a.max_batch_size}"
    print(f"{cpus} CPUs; {what}, {a.max_gen_len} greedy tokens; busy: {busy} busy process(es); together: "
          f"{a.together} runs at once; medians of {a.rounds} rounds (together: of every run's rate)\n")
    print("| situation | threads | tok/s (median) | all runs | first token s (median) |")
    print("|---|---|---|---|---|")
    for (situation, name), vals in got.items():
        rates = [v[0] for v in vals]
        print(f"| {situation} | {name} | {statistics.median(rates):.1f} | {', '.join(f'{x:.1f}' for x in rates)} "
              f"| {statistics.median(v[1] for v in vals):.2f} |")


if __name__ == "__main__":
    main()
