"""Decode speed with the KV cache in fp32, bf16 or fp16 (--kv_cache_dtype), at several context lengths, side by
side, and llama.cpp's on the same GGUF file where given.

    python scripts/bench_kv_cache.py --ckpt_dir checkpoints/smollm2-135m [--gguf model.gguf] [--lengths 16 2000 3800]
                                     [--rounds 3] [--new_tokens 64] [--kinds auto bf16 fp16] [--device cpu]

Loads the checkpoint once per cache type (one process, all kept). For each prompt length, every kind in turn,
--rounds times interleaved: the prompt (token ids, the same for all) is prefilled untimed, then --new_tokens greedy
decode steps are timed; the median and best rate of the rounds are printed. With --gguf, llama.cpp (the optional
bench dependency llama-cpp-python, as many threads as torch) does the same on that file: the prompt evaluated,
then one token evaluated at a time. bf16/fp16 halve the cache's bytes, and what a step reads of it: faster at long
contexts where reading the cache bounds the attention (results: docs/benchmarks.md).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ours(llama, ids, n):
    """Decode tokens/s for n greedy steps after prefilling ids into cache row 0."""
    import torch

    eng = llama.engine
    nxt = eng.prefill([0], [ids]).argmax(-1)
    start = time.perf_counter()
    for i in range(n):
        nxt = eng.decode(nxt, [len(ids) + i]).argmax(-1)
    return n / (time.perf_counter() - start) if torch.is_tensor(nxt) else 0.0


def theirs(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([llm.sample(top_k=1)])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--gguf", default=None, help="also time llama.cpp on this file (llama-cpp-python)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 2000, 3800])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--kinds", nargs="+", default=["auto", "bf16", "fp16"])
    ap.add_argument("--device", default=None)
    a = ap.parse_args()

    import torch

    from llama_cli import Llama
    from llama_cli.tokenizer import find_tokenizer

    seq = max(a.lengths) + a.new_tokens + 1
    runs = {f"--kv_cache_dtype {k}": (ours, Llama.build(a.ckpt_dir, find_tokenizer(a.ckpt_dir), max_seq_len=seq,
                                                         max_batch_size=1, device=a.device, kv_cache_dtype=k))
            for k in a.kinds}
    vocab = next(iter(runs.values()))[1].tokenizer.n_words
    if a.gguf:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quant import llama_cpp_model

        lc, _ = llama_cpp_model(Path(a.gguf), n_ctx=seq, n_batch=512)
        if lc is not None:
            runs["llama.cpp (its f16 cache)"] = (theirs, lc)
    print(f"{a.ckpt_dir}; {a.new_tokens} greedy decode steps after each prompt; tokens/s, median / best of "
          f"{a.rounds} rounds; {torch.get_num_threads()} threads\n")
    print("| prompt tokens | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for n in a.lengths:
        ids = [(i * 7919) % (vocab - 3) + 3 for i in range(n)]
        rates = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, (fn, model) in runs.items():
                rates[name].append(fn(model, ids, a.new_tokens))
        print(f"| {n} | " + " | ".join(f"{statistics.median(r):.1f} / {max(r):.1f}" for r in rates.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
