"""Decode and prefill speed of llama-cli against HF transformers, on the same random weights.

    python scripts/bench.py [--shapes tiny smollm2-135m llama2-7b] [--batch 1 16 64] [--new_tokens 256]
                            [--prompt_len 16] [--device cpu|cuda] [--dtype fp32|bf16] [--compile auto|on|off]
                            [--no_hf]

Prints one table: for each shape and batch size, this tool's and HF's decode tokens/s (all rows
together), prefill tokens/s, time to first token, the weight bytes read per second while decoding
(achieved GB/s) and that as a % of the copy bandwidth measured at the start of the same run.
Greedy decoding with the stop token masked, so every run produces exactly --new_tokens tokens.
The HF rows use `LlamaForCausalLM.generate` eagerly, and on CUDA also with its static cache.
llama2-7b runs only on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SHAPES = {
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, "vocab": 512},
    # SmolLM2-135M: GQA 9/3 heads, FFN 1536, tied embeddings, vocab 49152
    "smollm2-135m": {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "multiple_of": 256,
                     "vocab": 49152, "rope_theta": 100000.0},
    "llama2-7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "multiple_of": 256, "vocab": 32000},
}


def sync(device):
    import torch

    if device.type != "cpu":
        torch.accelerator.synchronize()


def bandwidths(device, nbytes=1 << 30) -> tuple[float, float]:
    """(copy, read) bytes per second: a large device copy counted as read + write, and a sum
    over a large tensor (read only), best of several runs."""
    import torch

    if device.type == "cpu":
        nbytes = 512 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best_copy = best_read = float("inf")
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        sync(device)
        best_read = min(best_read, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best_copy, nbytes / best_read


def make_checkpoint(shape: str, folder: Path, dtype) -> tuple[dict, dict]:
    """Random weights for `shape` in Meta layout, saved as one shard; returns (params, weights)."""
    import json

    import torch

    from helpers import random_weights

    spec = dict(SHAPES[shape])
    vocab = spec.pop("vocab")
    params = {**spec, "vocab_size": vocab, "norm_eps": 1e-5}
    weights = random_weights(params, vocab, seed=0, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(weights, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(b"")  # never read: the bench feeds token ids
    return params, weights


def time_ours(folder, vocab, batch, prompt_len, new_tokens, device, dtype, compile_mode, max_seq_len=None,
              quantize=None, group_size=None):
    """(ttft_s, prefill tok/s, decode tok/s) through Llama.generate."""
    import torch

    from llama_cli import Llama, generation

    class IdsOnly:  # the bench feeds token ids; only the vocabulary size and ids matter
        n_words, bos_id, eos_id, pad_id, stop_ids = vocab, 1, 2, -1, frozenset({-1})  # never stop early

    real = generation.load_tokenizer
    generation.load_tokenizer = lambda path: IdsOnly()
    try:
        llama = Llama.build(str(folder), str(folder / "tokenizer.model"),
                            max_seq_len=max_seq_len or prompt_len + new_tokens + 8,
                            max_batch_size=batch, device=device, dtype=dtype, compile=compile_mode,
                            quantize=quantize, group_size=group_size)
    finally:
        generation.load_tokenizer = real
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
    llama.generate(prompts, max_gen_len=8, temperature=0)  # warm-up (and compilation)
    sync(llama.device)
    t = time.perf_counter()
    llama.generate(prompts, max_gen_len=1, temperature=0)
    sync(llama.device)
    ttft = time.perf_counter() - t
    warm = llama.engine.warmup_s
    t = time.perf_counter()
    out, _ = llama.generate(prompts, max_gen_len=new_tokens, temperature=0)
    sync(llama.device)
    total = time.perf_counter() - t - (llama.engine.warmup_s - warm)  # a graph captured on the way: excluded
    assert all(len(o) == new_tokens for o in out)
    decode = batch * (new_tokens - 1) / max(total - ttft, 1e-9)
    del llama
    gc.collect()
    return ttft, batch * prompt_len / ttft, decode


def time_hf(params, weights, vocab, batch, prompt_len, new_tokens, device, dtype, static_cache=False):
    import torch

    from helpers import to_hf

    model = to_hf(params, weights, vocab, max_positions=prompt_len + new_tokens + 8).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    kw = {"cache_implementation": "static"} if static_cache else {}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)

    def run(n):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        sync(device)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    run(8)
    ttft = run(1)
    total = run(new_tokens)
    del model
    gc.collect()
    return ttft, batch * prompt_len / ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9)


def weight_bytes(params, vocab, dtype) -> int:
    from llama_cli.memory import weight_bytes as wb
    from llama_cli.checkpoint import args_from_params

    args, _ = args_from_params({**params, "vocab_size": vocab})
    return wb(args, 1, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "smollm2-135m", "llama2-7b"], choices=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="default: fp32 on cpu, bf16 on GPUs")
    ap.add_argument("--compile", default="both", choices=["auto", "on", "off", "both"],
                    help="both: a row for eager and a row for compiled decoding")
    ap.add_argument("--no_hf", action="store_true")
    ap.add_argument("--max_seq_len", type=int, nargs="+", default=None,
                    help="cache sizes to run llama-cli at (default: just enough); one row each")
    ap.add_argument("--quantize", nargs="+", default=["none"],
                    help="weight forms to run llama-cli with: none, int8, int4, int4:32 (int4, group 32), ...")
    a = ap.parse_args()

    import torch

    from llama_cli.devices import pick_device, pick_dtype

    device = pick_device(a.device)
    dtype = pick_dtype(device, a.dtype if a.dtype else ("fp32" if device.type == "cpu" else None))
    bw, read_bw = bandwidths(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'} " \
        f"({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {str(dtype).replace('torch.', '')}; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s (read + write), read bandwidth {read_bw / 1e9:.1f} GB/s; prompt {a.prompt_len} "
          f"tokens, {a.new_tokens} greedy tokens; --compile {a.compile}\n")
    print("| shape | batch | impl | decode tok/s | prefill tok/s | TTFT ms | GB/s | % of copy bw | % of read bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes:
            if shape == "llama2-7b" and device.type == "cpu":
                continue
            folder = Path(tmp) / shape
            params, weights = make_checkpoint(shape, folder, dtype)
            vocab = SHAPES[shape]["vocab"]
            wbytes = weight_bytes(params, vocab, dtype)
            modes = ["off", "on"] if a.compile == "both" else [a.compile]
            def form(qz):
                mode, _, g = qz.partition(":")
                return (None, None) if mode == "none" else (mode, int(g) if g else None)

            impls = [(f"llama-cli compile={m}" + (f" max_seq_len={L}" if L else "")
                      + (f" {qz}" if qz != "none" else ""),
                      lambda b, m=m, L=L, qz=qz: time_ours(folder, vocab, b, a.prompt_len, a.new_tokens, device, dtype,
                                                           m, L, *form(qz)))
                     for qz in a.quantize for m in modes for L in (a.max_seq_len or [None])]
            if not a.no_hf:
                impls.append(("HF eager", lambda b: time_hf(params, weights, vocab, b, a.prompt_len, a.new_tokens,
                                                            device, dtype)))
                if device.type == "cuda":
                    impls.append(("HF static cache", lambda b: time_hf(params, weights, vocab, b, a.prompt_len,
                                                                       a.new_tokens, device, dtype, True)))
            for b in a.batch:
                for impl, fn in impls:
                    ttft, prefill, decode = fn(b)
                    gbs = wbytes * decode / b / 1e9  # every decode step reads all weights once
                    print(f"| {shape} | {b} | {impl} | {decode:.1f} | {prefill:.0f} | {ttft * 1e3:.1f} | "
                          f"{gbs:.1f} | {100 * gbs * 1e9 / bw:.0f}% | {100 * gbs * 1e9 / read_bw:.0f}% |", flush=True)
            del weights
            gc.collect()


if __name__ == "__main__":
    main()
