"""One-call GPU check, for a machine with a CUDA GPU (prepared for the device lent to some issues).

    python scripts/gpu_check.py [--skip_7b]

1. NCCL: initialises a 1-process NCCL group through Llama.build (WORLD_SIZE=1 needs none, so the
   check sets up torch.distributed itself with a loopback store) and runs an all_reduce.
2. bf16 greedy on the GPU against fp32 greedy on the CPU, tiny random model: the first tokens agree.
3. Compiled (reduce-overhead, CUDA graphs) greedy == eager greedy on the GPU.
4. Unless --skip_7b: scripts/bench.py's Llama-2-7B-shape table (batch 1 and 16), one model load per mode.
Prints PASS/FAIL lines; exit code 1 if any check fails.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip_7b", action="store_true")
    a = ap.parse_args()
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 0
    from helpers import TINY, make_model_folder, train_sentencepiece
    from llama_cli import Llama
    from llama_cli.distributed import backend_for

    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    dev = torch.device("cuda", 0)
    check("backend for cuda is nccl", backend_for(dev) == "nccl", backend_for(dev))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", device_id=dev)
    x = torch.ones(4, device=dev)
    dist.all_reduce(x)
    check("nccl all_reduce", bool((x == 1).all()))
    dist.destroy_process_group()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        os.environ.pop(k)

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_sentencepiece(Path(tmp) / "tok.model")
        folder, _ = make_model_folder(Path(tmp) / "tiny", tok, TINY)
        prompts = ["Hello world", "The cat sleeps under the tree because", "42"]
        runs = {}
        for name, kw in (("cpu-fp32", dict(device="cpu", dtype="fp32", compile="off")),
                         ("gpu-bf16", dict(dtype="bf16", compile="off")),
                         ("gpu-bf16-compiled", dict(dtype="bf16", compile="on"))):
            llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 96, 4, **kw)
            ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
            runs[name] = llama.generate(ids, max_gen_len=16, temperature=0)[0]
            check(f"{name} on {llama.device}", True, str(llama.model.tok_embeddings.weight.dtype))
        first = [r[:4] for r in runs["cpu-fp32"]]
        check("bf16 GPU greedy == fp32 CPU greedy (first 4 tokens)", [r[:4] for r in runs["gpu-bf16"]] == first,
              f"{[r[:4] for r in runs['gpu-bf16']]} vs {first}")
        check("compiled greedy == eager greedy (GPU bf16)", runs["gpu-bf16-compiled"] == runs["gpu-bf16"])
    if not a.skip_7b:
        rc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--shapes", "llama2-7b",
                             "--batch", "1", "16", "--compile", "on"]).returncode
        check("7B bench ran", rc == 0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
