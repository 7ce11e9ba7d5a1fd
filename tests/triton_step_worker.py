"""Run by tests/test_triton_step.py in a subprocess with TRITON_INTERPRET=1 (Triton's interpreter, on the CPU):
llama_cli/triton_step.py's kernels against the plain operations they replace, then a model with
model.FUSED_SMALL_OPS on against the same model with it off. Prints one JSON line of results."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY, make_model_folder  # noqa: E402
from llama_cli import Llama, model as model_mod, triton_step  # noqa: E402
from llama_cli.model import apply_rotary  # noqa: E402


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    """How far apart: the largest difference relative to the largest value, the share of equal elements."""
    got, want = got.float(), want.float()
    return {"shape_ok": got.shape == want.shape, "err": ((got - want).abs().max() / want.abs().max()).item(),
            "equal": (got == want).float().mean().item()}


def kernel_checks() -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype)[6:]
        for dim in (96, 256):  # not a power of two, and one
            x = torch.randn(3, 2, dim, generator=gen).to(dtype)
            r = torch.randn(3, 2, dim, generator=gen).to(dtype)
            w = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
            out[f"rms_norm {name} {dim}"] = compare(triton_step.rms_norm(x, w, 1e-5),
                                                    F.rms_norm(x, (dim,), eps=1e-5) * w)
            h, n = triton_step.add_rms_norm(x, r, w, 1e-5)
            out[f"add {name} {dim}"] = compare(h, x + r)
            out[f"add_rms_norm {name} {dim}"] = compare(n, F.rms_norm(x + r, (dim,), eps=1e-5) * w)
        gu = torch.randn(2, 3, 2 * 200, generator=gen).to(dtype)
        gate, up = gu.chunk(2, dim=-1)
        out[f"silu_mul {name}"] = compare(triton_step.silu_mul(gu), F.silu(gate) * up)
        # rotary on a view into a stacked product, as Attention passes it: q and k heads of a wider row
        hd, heads = 16, 5
        qkv = torch.randn(2, 3, (heads + 2) * hd, generator=gen).to(dtype)
        x = qkv[..., :heads * hd].view(2, 3, heads, hd)
        ang = torch.rand(2, 3, hd // 2, generator=gen) * 6
        cos, sin = ang.cos(), ang.sin()
        out[f"rotary {name}"] = compare(triton_step.rotary(x, cos, sin), apply_rotary(x, cos, sin))
        # a decode step's q/k rotated and k/v written to the cache: 2 rows (cache rows 2 and 0, positions 5 and
        # 9), 3 q heads, 2 kv heads, a cache in the activations' type and one in fp16
        hq, hkv = 3, 2
        qkv = torch.randn(2, 1, (hq + 2 * hkv) * hd, generator=gen).to(dtype)
        ang = torch.rand(2, 1, hd // 2, generator=gen) * 6
        cos, sin = ang.cos(), ang.sin()
        rows, pos = torch.tensor([2, 0]), torch.tensor([[5], [9]])
        for kind in dict.fromkeys((dtype, torch.float16)):
            ck, cv = (torch.zeros(3, hkv, 12, hd, dtype=kind) for _ in range(2))
            rk, rv = ck.clone(), cv.clone()
            got = triton_step.rotary_cache(qkv, cos, sin, ck, cv, rows, pos, hq, hkv)
            want = apply_rotary(qkv[..., :(hq + hkv) * hd].view(2, 1, hq + hkv, hd), cos, sin)
            rk[rows[:, None], :, pos] = want[:, :, hq:].to(kind)
            rv[rows[:, None], :, pos] = qkv[..., (hq + hkv) * hd:].view(2, 1, hkv, hd).to(kind)
            tag = f"cache {str(kind)[6:]}"
            out[f"rotary_cache {name} qk {tag}"] = compare(got, want)
            out[f"rotary_cache {name} k {tag}"] = compare(ck, rk)
            out[f"rotary_cache {name} v {tag}"] = compare(cv, rv)
    return out


def model_check(folder: Path, dtype: str) -> dict:
    """The same model (w1/w3 and q/k/v stacked, as on GPUs) with the kernels off and on: logits of a whole pass,
    greedy tokens through the engine's decode steps, and how often each kernel ran."""
    tok = str(folder / "tokenizer.model")
    llama = Llama.build(str(folder), tok, 64, 2, dtype=dtype, compile="off")
    llama.model.fuse()
    seq = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    ids = [[1, 5, 9, 14, 3, 7], [1, 22, 8]]
    model_mod.FUSED_SMALL_OPS = False
    ref = llama.model(seq)
    ref_tokens = llama.generate(ids, max_gen_len=8, temperature=0)[0]
    calls = {}
    real = {name: getattr(triton_step, name) for name in ("rms_norm", "add_rms_norm", "silu_mul", "rotary",
                                                           "rotary_cache")}
    for name, fn in real.items():
        def counted(*a, _real=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        setattr(triton_step, name, counted)
    model_mod.FUSED_SMALL_OPS = True
    try:
        got = llama.model(seq)
        tokens = llama.generate(ids, max_gen_len=8, temperature=0)[0]
    finally:  # each dtype's check counts its own calls
        model_mod.FUSED_SMALL_OPS = False
        for name, fn in real.items():
            setattr(triton_step, name, fn)
    return {**compare(got, ref), "same_tokens": tokens == ref_tokens, "calls": calls}


if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    folder, _ = make_model_folder(tmp / "m", sys.argv[2], {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2,
                                                           "multiple_of": 128}, seed=2)
    print(json.dumps({"kernels": kernel_checks(), **{d: model_check(folder, d) for d in ("fp32", "fp16", "bf16")}}))
