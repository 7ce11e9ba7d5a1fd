"""llama_cli/triton_step.py: the eager GPU step's small operations as one Triton kernel each (a candidate,
model.FUSED_SMALL_OPS, off by default), run by Triton's interpreter on the CPU (tests/triton_step_worker.py).
Their speed is for scripts/gpu_check.py on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import record_launches, subprocess_env


def test_small_op_kernels_agree_with_the_operations_they_replace(tmp_path, spm_path):
    """Each kernel against the plain operations (norm with its weight, the residual add and the norm after it,
    the gated unit, the rotary embedding on a strided view into a stacked product, and in a decode step with
    the keys and values written to the cache, rows and positions of their own, GQA, a cache in fp16; a width
    that is not a power of two): fp32 to its rounding; fp16 rounded where the plain operations round (equal
    but for the odd element a sum's order moves by one step); bf16 within a step (the interpreter narrows to
    bf16 toward zero, a GPU to the nearest); and a model with the kernels on gives the plain model's logits
    and greedy tokens, every kernel having run."""
    env = {**subprocess_env(), "TRITON_INTERPRET": "1", "LLAMA_CLI_NATIVE": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "triton_step_worker.py"), str(tmp_path),
                           spm_path], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["kernels"]) == 3 * (2 * 3 + 2) + 3 * 5  # rotary_cache: two cache types, one for fp16
    for name, r in res["kernels"].items():
        assert r["shape_ok"], name
        dtype = name.split()[1]
        if dtype == "float32":
            assert r["err"] < 1e-5, (name, r)
        elif dtype == "float16":
            assert r["err"] < 2e-3 and r["equal"] > 0.97, (name, r)
        else:
            assert r["err"] < 1.6e-2, (name, r)
    for dtype, bound in (("fp32", 1e-5), ("fp16", 5e-3), ("bf16", 5e-2)):
        m = res[dtype]
        assert m["shape_ok"] and m["err"] < bound, (dtype, m)
        assert m["same_tokens"] or dtype == "bf16", dtype
        # rotary: the prefills; rotary_cache: the decode steps
        assert set(m["calls"]) == {"rms_norm", "add_rms_norm", "silu_mul", "rotary", "rotary_cache"}, m["calls"]


def test_small_op_kernels_compile_for_a_gpu(monkeypatch):
    """Each kernel compiled for an H100 (sm_90) and an A100 (sm_80) by Triton's compiler and the ptxas in its
    wheel (no GPU needed; what the interpreter cannot tell), for the arguments the wrappers pass at the 7B shape
    in bf16, as the JIT specializes them (integers and pointers divisible by 16 marked so), with the fused
    multiply-adds each launch asks for."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llama_cli import triton_step as ts

    calls = record_launches(monkeypatch, ts, ("_rms_norm", "_add_rms_norm", "_silu_mul", "_rotary", "_rotary_cache"))
    bf = dict(dtype=torch.bfloat16)
    x, w = torch.zeros(1, 1, 4096, **bf), torch.ones(4096, **bf)
    ts.rms_norm(x, w, 1e-5)
    ts.add_rms_norm(x, x, w, 1e-5)
    ts.silu_mul(torch.zeros(1, 1, 2 * 11008, **bf))
    qkv = torch.zeros(1, 1, 96 * 128, **bf)
    ts.rotary(qkv[..., :64 * 128].view(1, 1, 64, 128), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64))
    cache = torch.zeros(2, 32, 512, 128, **bf)
    ts.rotary_cache(qkv, torch.zeros(2, 1, 64), torch.zeros(2, 1, 64), cache, cache.clone(), torch.arange(2),
                    torch.tensor([[7], [9]]), 32, 32)
    types = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}
    compiled = 0
    for kernel, args, kw, options in calls:
        assert options == ts.FP_FUSION, (kernel.__name__, options)
        sig, attrs = {}, {}
        for i, (name, v) in enumerate(zip(kernel.arg_names, args)):
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + types[v.dtype]
                aligned = v.data_ptr() % 16 == 0
            else:
                sig[name] = "fp32" if isinstance(v, float) else "i32"
                aligned = isinstance(v, int) and v % 16 == 0
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kernel, signature={**sig, **{c: "constexpr" for c in kw}}, constexprs=kw, attrs=attrs)
        for arch in (90, 80):
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                 options={"num_warps": 4, **options}).asm["ptx"]
            assert "st.global" in ptx, (kernel.__name__, arch)
            compiled += 1
    assert compiled == 5 * 2
