"""Run by tests/test_quant.py in a subprocess with TRITON_INTERPRET=1 (Triton's interpreter, on the CPU):
checks llama_cli/triton_gemv.py's int4 and int8 kernels against the dequantized weights' products, and int4
and int8 models whose layers use them (quant.CUDA_INT4 / CUDA_INT8 "triton", the CUDA branch patched in)
against the same models dequantizing. Prints one JSON line of results; the test asserts on them."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY, make_model_folder  # noqa: E402
from llama_cli import Llama, quant  # noqa: E402
from llama_cli.triton_gemv import INT4_CONFIGS, INT8_CONFIGS, _config, int4_rows, int8_rows  # noqa: E402
from llama_cli.quant import dequantize, quantize  # noqa: E402


def kernel_errors() -> list:
    """Each kernel in the first configuration of each way x reaches the threads (X_TILE 0 and 1)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for x_tile in (0, 1):
        entry = next(e for e in INT4_CONFIGS if e[4] == x_tile)
        cfg, block_n = _config(entry, "GROUP_BYTES"), entry[0]
        # outputs not a multiple of BLOCK_N; groups not a multiple of a program's (256 bytes: 16 of 32, 4 of 128)
        for n, k, g, rows, dtype in ((3 * block_n + 5, 256, 32, 1, torch.float32), (40, 384, 128, 2, torch.float32),
                                     (24, 640, 64, 2, torch.bfloat16), (block_n, 1024, 256, 1, torch.bfloat16)):
            w = torch.randn(n, k, generator=gen)
            q, s, m = quantize(w, "int4", g)
            s, m = s.to(dtype), m.to(dtype)
            x = torch.randn(rows, k, generator=gen).to(dtype)
            ref = x.float() @ dequantize(q, s, m).T
            got = int4_rows(x, q, s, m, config=cfg)
            out.append({"kernel": "int4", "x_tile": x_tile, "shape": [n, k, g, rows], "dtype": str(dtype),
                        "out_dtype": str(got.dtype), "err": ((got.float() - ref).abs().max() / ref.abs().max()).item()})
        # int8 per row: outputs and inputs not multiples of the configuration's blocks
        entry = next(e for e in INT8_CONFIGS if e[4] == x_tile)
        cfg, (block_n, block_k) = _config(entry, "BLOCK_K"), entry[:2]
        for n, k, rows, dtype in ((2 * block_n + 3, block_k + 96, 1, torch.float32),
                                  (block_n, 3 * block_k, 2, torch.bfloat16)):
            w = torch.randn(n, k, generator=gen)
            q, s, _ = quantize(w, "int8", 0)
            s = s.to(dtype)
            x = torch.randn(rows, k, generator=gen).to(dtype)
            ref = x.float() @ dequantize(q, s, None).T
            got = int8_rows(x, q, s, config=cfg)
            out.append({"kernel": "int8", "x_tile": x_tile, "shape": [n, k, 0, rows], "dtype": str(dtype),
                        "out_dtype": str(got.dtype), "err": ((got.float() - ref).abs().max() / ref.abs().max()).item()})
    return out


def model_check(folder: Path, mode: str) -> dict:
    """A model quantized to `mode` with its layers on the Triton kernels against the same model dequantizing
    (int4: our form uncompiled; int8: its per-row product uncompiled)."""
    import llama_cli.generation as generation

    generation.is_cuda = lambda device: True  # the CUDA branch of build, with the CPU's tensors
    tok = str(folder / "tokenizer.model")
    kw = dict(compile="off", quantize=mode, group_size=32 if mode == "int4" else None)
    quant.CUDA_INT4, quant.CUDA_INT8 = "fused", "compiled"
    plain = Llama.build(str(folder), tok, 64, 2, **kw)
    quant.CUDA_INT4 = quant.CUDA_INT8 = "triton"
    kern = Llama.build(str(folder), tok, 64, 2, **kw)
    kinds = sorted({str(getattr(m, "kernel", None)) for m in kern.model.modules()
                    if getattr(m, "qweight", None) is not None})
    ids = [[1, 5, 9, 14, 3, 7], [1, 22, 8]]
    # 4 tokens: a prefill and three steps of two rows (each interpreted launch costs ~0.5 s on a slow CPU)
    a = plain.generate(ids, max_gen_len=4, temperature=0)[0]
    b = kern.generate(ids, max_gen_len=4, temperature=0)[0]
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(3))
    wq_k, wq_p = kern.model.layers[0].attention.wq, plain.model.layers[0].attention.wq
    one = (wq_k(x) - wq_p(x)).abs().max().item() / wq_p(x).abs().max().item()
    return {"kinds": kinds, "same_tokens": a == b, "one_row_err": one}


if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    folder, _ = make_model_folder(tmp / "m", sys.argv[2], {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2,
                                                           "multiple_of": 128}, seed=2)
    print(json.dumps({"kernel": kernel_errors(), "int4": model_check(folder, "int4"),
                      "int8": model_check(folder, "int8")}))
