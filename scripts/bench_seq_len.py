"""Does a decode step's cost follow the live tokens rather than --max_seq_len? One model, one process:
engines with a 256- and a 4096-position cache take turns decoding the same positions (16..150).

    python scripts/bench_seq_len.py --ckpt_dir checkpoints/smollm2-135m [--compile on|off] [--batch 1]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch

    from llama_cli import Llama
    from llama_cli.engine import Engine
    from llama_cli.tokenizer import find_tokenizer

    on = a.compile == "on"
    llama = Llama.build(a.ckpt_dir, find_tokenizer(a.ckpt_dir), 256, a.batch, compile=on)
    rates = {256: [], 4096: []}
    for _ in range(a.rounds):
        for seq in (256, 4096):
            eng = Engine(llama.model, a.batch, seq, compile=on)
            eng.prefill(range(a.batch), [[5] * 16] * a.batch)
            tok = torch.full((a.batch,), 7)
            for p in range(16, 24):  # warm-up (compiling, the first time)
                eng.decode(tok, [p] * a.batch)
            t = time.perf_counter()
            for p in range(24, 150):
                eng.decode(tok, [p] * a.batch)
            rates[seq].append(a.batch * 126 / (time.perf_counter() - t))
    best = {k: max(v) for k, v in rates.items()}
    print(f"batch {a.batch}, compile {a.compile}: max_seq_len 256 {best[256]:.1f} tok/s, 4096 {best[4096]:.1f} tok/s "
          f"({100 * best[4096] / best[256]:.0f}%); all runs {rates}")


if __name__ == "__main__":
    main()
