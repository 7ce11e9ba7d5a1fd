"""llama_cli/triton_step.py: the eager GPU step's small operations as one Triton kernel each (a candidate,
model.FUSED_SMALL_OPS, off by default), run by Triton's interpreter on the CPU (tests/triton_step_worker.py).
Their speed is for scripts/gpu_check.py on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env


def test_small_op_kernels_agree_with_the_operations_they_replace(tmp_path, spm_path):
    """Each kernel against the plain operations (norm with its weight, the residual add and the norm after it,
    the gated unit, the rotary embedding on a strided view into a stacked product; a width that is not a power
    of two): fp32 to its rounding; fp16 rounded where the plain operations round (equal but for the odd element
    a sum's order moves by one step); bf16 within a step (the interpreter narrows to bf16 toward zero, a GPU
    to the nearest); and a model with the kernels on gives the plain model's logits and greedy tokens, every
    kernel having run."""
    env = {**subprocess_env(), "TRITON_INTERPRET": "1", "LLAMA_CLI_NATIVE": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "triton_step_worker.py"), str(tmp_path),
                           spm_path], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["kernels"]) == 3 * (2 * 3 + 2)
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
        assert set(m["calls"]) == {"rms_norm", "add_rms_norm", "silu_mul", "rotary"}, m["calls"]
