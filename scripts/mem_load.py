"""Peak resident memory per rank when loading a checkpoint on 1, 2 and 4 processes.

    python scripts/mem_load.py [--dir /tmp/mem-ckpt] [--shards 4] [--procs 1 2 4] [--dtype fp32]

Writes a random ~1 GB fp32 checkpoint (dim 1024, 20 layers) in --shards shards, then loads it
with `Llama.build` under torchrun (gloo, CPU) for each process count and prints, per rank:
the resident memory after importing torch (the fixed overhead), the peak resident memory
(VmHWM) during the whole load, and at the end how much of the resident memory is private
(RssAnon: copies made while merging or converting) versus mapped from the checkpoint files
(RssFile: page cache, shared and reclaimable).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(ckpt: str, dtype: str, out: str) -> None:
    import torch  # noqa: F401  (the fixed overhead is measured after this)

    base = status()
    from llama_cli import Llama

    llama = Llama.build(ckpt, os.path.join(ckpt, "tokenizer.model"), max_seq_len=64, max_batch_size=1, dtype=dtype)
    llama.text_completion(["the"], max_gen_len=2, temperature=0)  # touch every weight once
    after = status()
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"base": base, "after": after}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llama-cli-mem-ckpt")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtype", default="fp32", help="load precision (fp32 = as stored: no conversion copies)")
    ap.add_argument("--worker", nargs=3, metavar=("CKPT", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(*a.worker)
    ckpt = Path(a.dir)
    if not (ckpt / f"consolidated.{a.shards - 1:02d}.pth").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), "--out", str(ckpt),
                        "--shards", str(a.shards), "--dim", "1024", "--n_layers", "20", "--n_heads", "16",
                        "--n_kv_heads", "16", "--multiple_of", "256", "--dtype", "fp32"], check=True)
    size = sum(p.stat().st_size for p in ckpt.glob("*.pth"))
    mib = 1024 * 1024
    print(f"checkpoint: {size / mib:.0f} MiB in {a.shards} shards, loaded as {a.dtype}\n")
    print("| processes | rank | after `import torch` | peak RSS (VmHWM) | peak - import | RssAnon at end | "
          "RssFile at end |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for n in a.procs:
        out = f"/tmp/llama-cli-mem-{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               __file__, "--worker", str(ckpt), a.dtype, out]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(n):
            d = json.load(open(f"{out}.{r}"))
            b, e = d["base"], d["after"]
            print(f"| {n} | {r} | {b['VmRSS'] / mib:.0f} MiB | {e['VmHWM'] / mib:.0f} MiB | "
                  f"{(e['VmHWM'] - b['VmRSS']) / mib:.0f} MiB | {e['RssAnon'] / mib:.0f} MiB | "
                  f"{e['RssFile'] / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
