"""Our CPU kernels (llama_cli/csrc/, built by native.py): the products they compute are the
dequantized (or dense) weight's, for every group size and row count they take; a CPU int4, int8 or fp32
model uses them and gives the logits of the model without them; where they cannot be built, layers run as
before, with a warning."""

import logging

import pytest
import torch

from helpers import TINY, make_model_folder
from llama_cli import Llama, native
from llama_cli.quant import dequantize, quantize

BIG = {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 128}


def _product(ops, mode, x, q, scale, offset):
    return ops.int4_gemv(x, q, scale, offset) if mode == "int4" else ops.int8_gemv(x, q, scale)


@pytest.mark.parametrize("mode,out,inp,group", [("int4", 48, 64, 32), ("int4", 96, 256, 64), ("int4", 40, 384, 128),
                                                ("int4", 8, 512, 256), ("int8", 48, 64, 0), ("int8", 24, 384, 0),
                                                ("int8", 40, 256, 32), ("int8", 16, 512, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 33])  # 33: past the kernel's rows, dequantized for BLAS
def test_kernel_is_the_dequantized_product(ops, mode, out, inp, group, rows):
    g = torch.Generator().manual_seed(out + rows)
    w = torch.randn(out, inp, generator=g)
    q, scale, offset = quantize(w, mode, group)
    x = torch.randn(rows, inp, generator=g)
    ref = x @ dequantize(q, scale, offset).T
    got = _product(ops, mode, x, q, scale, offset)
    assert got.shape == (rows, out)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5
    # each output's own scale is used: a change to one moves that output alone
    scale2 = scale.clone()
    scale2[out // 2, 0] *= 2
    moved = (_product(ops, mode, x, q, scale2, offset) - got).abs().amax(0) > 1e-6
    assert moved.tolist() == [i == out // 2 for i in range(out)]


@pytest.mark.parametrize("out,inp", [(48, 64), (40, 100), (8, 1536)])  # 100: a tail past the vector width
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])  # past the kernel's rows (8; 16 for narrow weights), BLAS
def test_dense_kernel_is_the_product(ops, out, inp, rows):
    g = torch.Generator().manual_seed(inp + rows)
    w, x = torch.randn(out, inp, generator=g), torch.randn(rows, inp, generator=g)
    ref = x @ w.T
    got = ops.dense_gemv(x, w)
    assert got.shape == (rows, out) and ((got - ref).abs().max() / ref.abs().max()) < 1e-5


# fp16's edge cases: zeros, the smallest subnormal and one with its top bit, the largest finite value, values
# whose widening must be exact; bf16's likewise (subnormals, a large value)
HALF_EDGES = {torch.float16: [0.0, -0.0, 2 ** -24, -(2 ** -15), 65504.0, 1 / 3, -2.5, 1e-3],
              torch.bfloat16: [0.0, -0.0, 2 ** -133, -(2 ** -127), 1e38, 1 / 3, -2.5, 1e-3]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,inp", [(48, 64), (40, 100), (8, 1536)])  # 100: a tail past the vector width
@pytest.mark.parametrize("rows", [1, 3, 8, 12, 13, 17])  # past the kernel's rows (12; 16 narrow): widened, BLAS
def test_dense_kernel_reads_half_width_weights_exactly(ops, dtype, out, inp, rows):
    """A bf16 or fp16 weight (as a checkpoint stores it) times fp32 rows: the product with the weight widened
    to fp32, which is exact; each edge value, in the vector body and in the tail, comes through as PyTorch
    widens it."""
    g = torch.Generator().manual_seed(inp + rows)
    w, x = torch.randn(out, inp, generator=g).to(dtype), torch.randn(rows, inp, generator=g)
    ref = x @ w.float().T
    got = ops.dense_gemv(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5
    edges = torch.tensor(HALF_EDGES[dtype], dtype=dtype)
    w2 = torch.zeros(len(edges), inp, dtype=dtype)
    for i in range(len(edges)):
        w2[i, i] = edges[i]  # in the body
        w2[i, inp - 1] = edges[i]  # the last column: the tail where inp is not a multiple of the vector width
    x2 = torch.zeros(1, inp)
    x2[0, :len(edges)], x2[0, inp - 1] = 1.0, 0.5
    assert torch.equal(ops.dense_gemv(x2, w2)[0], edges.float() * 1.5)


@pytest.mark.parametrize("form", ["int4", "int8", "bf16", "fp16", "fp32"])
def test_products_past_the_kernels_rows(ops, form):
    """Past the kernels' rows the weight goes to BLAS (widened or dequantized a block of its rows at a time into
    one scratch buffer: 66,000 rows of 64 make two blocks), as W @ x.T (rows padded to a multiple of 8) up to 128
    rows for weights of 2^21+ elements, x @ W.T for smaller ones (the second block, the 300-row weight) and beyond."""
    for out in (66_000, 300):
        _check_past_the_kernels(ops, form, out)


def _check_past_the_kernels(ops, form, out):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out, 64, generator=g)
    if form in ("int4", "int8"):
        parts = quantize(w, form, 32)
        ref_w = dequantize(*parts)
        parts = parts if form == "int4" else parts[:2]
    else:
        parts = (w.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[form]),)
        ref_w = parts[0].float()
    op = {"int4": ops.int4_gemv, "int8": ops.int8_gemv}.get(form, ops.dense_gemv)
    for rows in (13, 40, 47, 130):
        x = torch.randn(rows, 64, generator=g)
        ref = x.double() @ ref_w.double().T
        got = op(x, *parts)
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5, rows


def test_kernels_refuse_other_forms(ops):
    q, scale, offset = quantize(torch.randn(16, 64), "int4", 32)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.int4_gemv(torch.randn(1, 64, dtype=torch.bfloat16), q, scale, offset)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.int4_gemv(torch.randn(1, 128), q, scale, offset)
    q8, s8, _ = quantize(torch.randn(16, 64), "int8", 0)
    with pytest.raises(RuntimeError, match="int8"):
        ops.int8_gemv(torch.randn(1, 64), q8.to(torch.uint8), s8)
    with pytest.raises(RuntimeError, match="dense_gemv: dense the weight must be fp32, bf16 or fp16"):
        ops.dense_gemv(torch.randn(1, 64), torch.ones(8, 64, dtype=torch.float64))


def _decode_logits(llama, ids, steps=4):
    """Logits of a prefill then `steps` one-row greedy decode steps."""
    eng = llama.engine
    out = [eng.prefill([0], [ids])]
    pos = len(ids)
    for _ in range(steps):
        out.append(eng.decode(out[-1].argmax(-1), [pos]))
        pos += 1
    return torch.cat(out)


def _kernels(llama):
    """The kernels of the linear layers (the embeddings' lookups need none)."""
    return {m.kernel for m in llama.model.modules() if hasattr(m, "kernel")}


@pytest.mark.parametrize("mode,compile", [("int4", "off"), ("int4", "on"), ("int8", "off"), ("int8", "on"),
                                          (None, "off"), (None, "on")])
def test_quantized_model_uses_the_kernels_and_gives_the_same_logits(tmp_path, spm_path, ops, monkeypatch, mode,
                                                                    compile):
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=5)
    tok = str(folder / "tokenizer.model")
    fast = Llama.build(str(folder), tok, 64, 1, quantize=mode, compile=compile)
    monkeypatch.setenv("LLAMA_CLI_NATIVE", "0")
    plain = Llama.build(str(folder), tok, 64, 1, quantize=mode, compile=compile)
    # every linear layer, the output layer too (int4 models' output is int4 when it is not tied)
    assert _kernels(fast) == {f"{mode or 'dense'}-native"} and _kernels(plain) == {None}
    ids = fast.tokenizer.encode("Hello world, how are", bos=True, eos=False)
    a, b = _decode_logits(fast, ids), _decode_logits(plain, ids)
    assert ((a - b).abs().max() / b.abs().max()) < 1e-4


def test_a_failed_build_falls_back_with_a_warning(tmp_path, spm_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_cpu_ok", lambda: None)

    def no_compiler(build):
        raise RuntimeError("Error building extension 'llama_cli_native'\nc++: command not found")
    monkeypatch.setattr(native, "_load", no_compiler)
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=9)
    with caplog.at_level(logging.WARNING, logger="llama_cli"):
        llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1, quantize="int4")
    assert "our CPU kernels could not be built (c++: command not found)" in caplog.text
    assert _kernels(llama) == {None}
    ids = llama.tokenizer.encode("Hello", bos=True, eos=False)
    assert len(llama.generate([ids], max_gen_len=4, temperature=0)[0][0]) == 4


def test_a_damaged_kept_build_is_built_again(tmp_path):
    """A kept library that no longer loads (damaged on disk) is built again, once, instead of leaving every
    later run on the portable path (ninja alone would keep the file: its inputs have not changed)."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers import subprocess_env

    if not native.ready():
        pytest.skip("our CPU kernels do not build on this machine")
    kept = native._build_dir()
    copy = tmp_path / "cache" / "native" / kept.name
    shutil.copytree(kept, copy)
    (copy / "llama_cli_native.so").write_bytes(os.urandom(4096))
    probe = "import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.INFO); " \
            "from llama_cli import native; print(native.ready())"
    env = {**subprocess_env(), "LLAMA_CLI_CACHE": str(tmp_path / "cache")}
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
        assert proc.stdout.strip() == "True", proc.stderr
        assert ("would not load" in proc.stderr) == (attempt == 0), proc.stderr  # the second run loads it


def test_a_build_its_killed_builder_left_does_not_hold_later_runs(tmp_path):
    """Found by hand: torch's cpp_extension marks a build in progress with a file ("lock") it removes when done;
    a builder killed outright (SIGKILL, the OOM killer, torchrun ending its workers) left it behind, and every
    later run waited for it for ever after "building our CPU kernels". Processes now take turns on a lock the
    system drops when its holder ends: one waiting for another's turn says so, then removes the stale file,
    builds and loads."""
    import fcntl
    import shutil
    import subprocess
    import sys
    import threading

    from helpers import subprocess_env

    if not native.ready():
        pytest.skip("our CPU kernels do not build on this machine")
    kept = native._build_dir()
    copy = tmp_path / "cache" / "native" / kept.name
    shutil.copytree(kept, copy)
    (copy / "ready").unlink()  # a build that never finished,
    (copy / "lock").write_text("")  # and the file its killed builder left
    probe = "import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.INFO); " \
            "from llama_cli import native; print(native.ready())"
    env = {**subprocess_env(), "LLAMA_CLI_CACHE": str(tmp_path / "cache")}
    with open(copy / "build.lock", "a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # another process's turn, for now
        proc = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        first = proc.stderr.readline()
        assert f"waiting for another process building our CPU kernels in {copy}" in first
        assert proc.poll() is None  # it waits its turn
    out, err = proc.communicate()
    watchdog.cancel()
    assert out.strip() == "True", first + err
    assert not (copy / "lock").exists() and (copy / "ready").is_file()


CHECK_ANOTHER_ISA = r"""
import sys
import torch
from torch.utils import cpp_extension
from llama_cli import native
from llama_cli.quant import dequantize, quantize

flags, folder = sys.argv[1].split(), sys.argv[2]
cpp_extension.load("llama_cli_native_isa", [str(native.SOURCE)], extra_cflags=["-O3", *flags, "-fopenmp"],
                   extra_ldflags=["-fopenmp"], build_directory=folder, is_python_module=False)
worst = 0.0
for mode, out, inp, group, rows in [("int4", 48, 64, 32, 1), ("int4", 96, 256, 64, 5), ("int4", 40, 384, 128, 3),
                                    ("int8", 48, 64, 0, 2), ("int8", 40, 256, 32, 9)]:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out))
    q, s, m = quantize(w, mode, group)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
    ref = x @ dequantize(q, s, m).T
    got = torch.ops.llama_cli.int4_gemv(x, q, s, m) if mode == "int4" else torch.ops.llama_cli.int8_gemv(x, q, s)
    worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
for dtype, edges in [(torch.float16, [2 ** -24, -(2 ** -15), 65504.0, 1 / 3, -0.0]),  # the dense kernel's widening
                     (torch.bfloat16, [2 ** -133, 3.38e38, 1 / 3, -2.5, -0.0])]:
    for inp, rows in [(100, 1), (64, 3), (37, 9)]:
        w = torch.randn(24, inp, generator=torch.Generator().manual_seed(inp)).to(dtype)
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
        ref = x.double() @ w.double().T
        got = torch.ops.llama_cli.dense_gemv(x, w)
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        w[0, :5] = w[1, -5:] = torch.tensor(edges, dtype=dtype)
        one_hot = torch.eye(inp)  # each edge value alone, at the start of a row and in its tail: exact
        y = torch.ops.llama_cli.dense_gemv(torch.cat([one_hot[:5], one_hot[-5:]]).contiguous(), w)
        if not (torch.equal(y[:5, 0], w[0, :5].float()) and torch.equal(y[5:, 1], w[1, -5:].float())):
            worst = 1.0
# a whole decode step, each layer one call (cpu_step.py), against the plain eager layers
sys.path.insert(0, "tests")
from helpers import TINY, model_args, random_weights
from llama_cli.cpu_step import NativeStep
from llama_cli.model import Transformer
from llama_cli.parallel import _Linear
from llama_cli.quant import native_form, quantize_model

params = {**TINY, "dim": 128, "multiple_of": 128}
for mode in ("int4", "int8", None, "bf16"):
    with torch.device("meta"):
        m = Transformer(model_args(params, 320))
    weights = random_weights(params, 320, seed=3)
    if mode == "bf16":  # linear weights kept in bf16 under fp32 activations
        weights = {k: v.bfloat16() if k.endswith(("w1.weight", "w2.weight", "w3.weight", "wq.weight", "wk.weight",
                                                  "wv.weight", "wo.weight", "output.weight")) else v
                   for k, v in weights.items()}
    m.load_state_dict(weights, assign=True)
    m.requires_grad_(False)
    if mode in ("int4", "int8"):
        quantize_model(m, mode, 32)
    m.allocate_cache(2, 64)  # rows attending over 42 and 22 positions: whole vectors (8 or 16) and a tail
    m.prefill(torch.randint(3, 320, (2, 41), generator=torch.Generator().manual_seed(0)))
    tokens, pos = torch.tensor([5, 7]), torch.tensor([41, 21])
    ref = m.decode(tokens, pos, 42, eager=True)
    for x in m.modules():
        if isinstance(x, _Linear):
            native_form(x) if mode in ("int4", "int8") else setattr(x, "kernel", "dense-native")
    got = NativeStep.prepare(m)(tokens, pos)
    worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
print(worst)
"""


@pytest.mark.parametrize("flags", ["-march=native -mno-avx512f", "-march=x86-64"])
def test_the_other_vector_paths(tmp_path, ops, flags):
    """The AVX2 path (machines without AVX-512) and the plain C++ one, built here with those instruction
    sets and checked like the main build (the products, and whole decode steps of one native call a layer)
    (in a subprocess: one library per operator namespace)."""
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    proc = subprocess.run([sys.executable, "-c", CHECK_ANOTHER_ISA, flags, str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
