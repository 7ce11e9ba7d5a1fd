"""Weight-only int8/int4: the forms round-trip within their step, the quantized model is exactly the
model on the dequantized weights (checked against HF transformers), compiled = eager, bad input refused."""

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, make_model_folder, to_hf
from llama_cli import Llama
from llama_cli.cli import cli
from llama_cli.errors import UserError
from llama_cli.quant import check_mode, dequantize, pack4, quantize, quantized_linear, unpack4

BIG = {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 128}  # input sizes that 32..128 divide


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_forms_round_trip_within_half_a_step(mode, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q, scale, offset = quantize(w, mode, group)
    back = dequantize(q, scale, offset)
    g = group or 256
    step = scale.repeat_interleave(g, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert q.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert q.shape == ((48, 256) if mode == "int8" else (48, 128)) and scale.shape == (48, 256 // g)


def test_int4_packing():
    v = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack4(pack4(v, 32), 2), v)
    p = pack4(v, 32)
    assert p[0, 0] == v[0, 0] | (v[0, 16] << 4)  # GGUF's Q4 block layout: column j low, j + 16 high
    assert p[0, 16] == v[0, 32] | (v[0, 48] << 4)


@pytest.mark.parametrize("mode,group,dtype", [("int8", 0, torch.float32), ("int4", 32, torch.float32),
                                              ("int4", 32, torch.bfloat16)])
def test_compiled_product_equals_eager(mode, group, dtype):
    """bf16: activations and int4 tables as quant.CUDA_INT4 "fused" has them (the sums still in fp32)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    q, scale, offset = quantize(w, mode, group)
    scale, offset = scale.to(dtype), None if offset is None else offset.to(dtype)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = x.float() @ dequantize(q, scale, offset).T
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # of the largest output (bf16: the weights rounded too)
    eager = quantized_linear(x, q, scale, offset, 2)
    assert (eager.float() - ref).abs().max() <= tol * ref.abs().max()
    compiled = torch.compile(quantized_linear, fullgraph=True)(x, q, scale, offset, 2)
    assert compiled.dtype == dtype
    assert (compiled.float() - ref).abs().max() <= 10 * tol * ref.abs().max()


@pytest.mark.parametrize("mode,group,tol", [("int8", 0, 0.03), ("int4", 32, 0.3)])
def test_quantized_model_is_the_model_on_dequantized_weights(tmp_path, spm_path, mode, group, tol):
    folder, weights = make_model_folder(tmp_path / "m", spm_path, BIG, seed=7)
    tok = str(folder / "tokenizer.model")
    llama = Llama.build(str(folder), tok, 64, 2, quantize=mode, group_size=group)
    plain = Llama.build(str(folder), tok, 64, 2)
    assert llama.model.layers[0].attention.wq.weight is None  # the dense weight is gone
    deq = dict(weights)
    for name, mod in llama.model.named_modules():
        if getattr(mod, "qweight", None) is not None:
            deq[name + ".weight"] = dequantize(mod.qweight, mod.qscale, mod.qoffset)
    hf = to_hf(BIG, deq, llama.tokenizer.n_words)
    seq = torch.randint(3, llama.tokenizer.n_words, (2, 20), generator=torch.Generator().manual_seed(3))
    ours = llama.model(seq)
    with torch.no_grad():
        ref = hf(seq).logits
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-4  # exactly the dequantized model
    dense = plain.model(seq)
    err = ((ours - dense).abs().max() / dense.abs().max()).item()
    assert 0 < err < tol  # and within the quantization's error of the unquantized one


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_bf16_weights_kept_as_stored(tmp_path, spm_path, mode):
    """A bf16 checkpoint on the CPU keeps its linear weights in bf16 until --quantize replaces them: the same
    integers and tables as quantizing them widened to fp32 at load (--dtype fp32)."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=8, dtype=torch.bfloat16)
    tok = str(folder / "tokenizer.model")
    kept = Llama.build(str(folder), tok, 64, 1, quantize=mode)
    wide = Llama.build(str(folder), tok, 64, 1, quantize=mode, dtype="fp32")
    for a, b in [(kept.model.layers[1].feed_forward.w2, wide.model.layers[1].feed_forward.w2),
                 (kept.model.output, wide.model.output)]:
        assert a.weight is None and torch.equal(a.qweight, b.qweight) and torch.equal(a.qscale, b.qscale)
    seq = torch.randint(3, kept.tokenizer.n_words, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(kept.model(seq), wide.model(seq), rtol=1e-5, atol=1e-5)


def test_quantized_compiled_greedy_equals_eager(tmp_path, spm_path):
    from helpers import assert_same_or_near_tie

    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=8)
    tok = str(folder / "tokenizer.model")
    eager = Llama.build(str(folder), tok, 64, 1, quantize="int4", group_size=32, compile="off")
    compiled = Llama.build(str(folder), tok, 64, 1, quantize="int4", group_size=32, compile="on")
    ids = eager.tokenizer.encode("Hello world", bos=True, eos=False)
    a = eager.generate([ids], max_gen_len=16, temperature=0)[0][0]
    b = compiled.generate([ids], max_gen_len=16, temperature=0)[0][0]
    assert_same_or_near_tie(eager, ids, b, a)


def test_bad_quantization_input(tmp_path, spm_path, capsys):
    with pytest.raises(UserError, match="int8 or int4"):
        check_mode("int3", None)
    with pytest.raises(UserError, match="group_size for int4 must be one of 32, 64, 128, 256"):
        check_mode("int4", 0)
    from llama_cli.quant import pick_group

    assert pick_group("int4", None, [576, 1536]) == 32 and pick_group("int4", 64, [576]) == 64
    with pytest.raises(UserError, match=r"groups of 32 do not divide this model's input sizes \[48, 1530\]; use "
                       r"--quantize int8$"):
        pick_group("int4", None, [48, 1530])
    with pytest.raises(UserError, match=r"input sizes per process on 2 processes \[64, 176\]; use --quantize int8 or "
                       "fewer processes"):  # hidden size 352 in halves
        pick_group("int4", None, [64, 176], 2)
    assert pick_group("int8", None, [576]) == 0
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)  # dim 64: group 128 does not divide it
    base = ["--ckpt_dir", str(folder), "--prompt", "Hi", "--max_gen_len", "2"]
    assert cli(base + ["--quantize", "int4", "--group_size", "128"]) == 2
    assert "--group_size 128 does not divide this weight's input size 64" in capsys.readouterr().err
    assert cli(base + ["--quantize", "int4", "--temperature", "0", "-q"]) == 0  # default group 32 fits
    assert cli(base + ["--group_size", "32"]) == 2
    assert "--group_size goes with --quantize" in capsys.readouterr().err
    assert cli(base + ["--quantize", "fp4"]) == 2
    assert "--quantize must be int8 or int4" in capsys.readouterr().err
    assert cli(base + ["--quantize", "int4", "--group_size", "32", "--temperature", "0"]) == 0


# --- quantized checkpoints on disk: llama-cli quantize, GGUF kept as it is ----------------------------

def test_quantize_subcommand_writes_a_folder_that_loads_anywhere(tmp_path, spm_path, capsys):
    from helpers import greedy, run_torchrun

    folder, weights = make_model_folder(tmp_path / "m", spm_path, BIG, seed=9)
    out = tmp_path / "q4"
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(out), "--mode", "int4", "--group_size", "32"]) == 0
    import json

    assert json.loads((out / "params.json").read_text())["quantization"] == {
        "mode": "int4", "group_size": 32, "embeddings": {"mode": "int8", "group_size": 0}}
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert sd["layers.0.attention.wq.weight.q"].dtype == torch.uint8 and "layers.0.attention.wq.weight" not in sd
    assert sd["tok_embeddings.weight.q"].dtype == torch.int8 and "tok_embeddings.weight" not in sd
    held = sum(t.numel() * t.element_size() for t in sd.values())
    assert (out / "consolidated.00.pth").stat().st_size < held * 1.05 + 64 * 1024
    dense = (folder / "consolidated.00.pth").stat().st_size
    assert (out / "consolidated.00.pth").stat().st_size < dense * 0.3  # 4.5 (int8: 9) bits a weight of fp32's 32
    # it loads with no flag, and is what quantizing at load gives
    tok = str(folder / "tokenizer.model")
    on_disk = Llama.build(str(out), tok, 64, 2)
    at_load = Llama.build(str(folder), tok, 64, 2, quantize="int4", group_size=32)
    seq = torch.randint(3, on_disk.tokenizer.n_words, (2, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(on_disk.model(seq), at_load.model(seq))
    # on two processes (each holding whole groups of its half of every row-parallel weight)
    got = run_torchrun(2, out, tmp_path / "tr")
    assert got["greedy"] == greedy(out)
    from llama_cli import native

    assert got["native"] == native.available()  # int4 halves of each layer as native calls, where they build
    # resharded, still quantized
    assert cli(["reshard", "--ckpt_dir", str(out), "--out", str(tmp_path / "q4x2"), "--shards", "2"]) == 0
    assert greedy(tmp_path / "q4x2") == greedy(out)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_at_load_the_same_on_any_process_count(tmp_path, spm_path, mode):
    """--quantize at load on 2 processes: each holds half the columns of the row-parallel weights (wo, w2) and of
    the embeddings, whose int8 scales are one per row: taken over the whole row (a max across the processes),
    not over each half, so the model and its greedy tokens are one process's (int4's groups lie whole in
    each half; its embeddings are int8 per row too)."""
    from helpers import greedy, run_torchrun

    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=12)
    got = run_torchrun(2, folder, tmp_path / "tr", env={"GEN_QUANTIZE": mode})
    assert got["linear_dtype"] == "quantized"
    assert got["greedy"] == greedy(folder, quantize=mode)


def test_tied_model_quantized_reads_its_output_from_the_int8_embeddings(tmp_path, spm_path):
    """A checkpoint without output.weight: quantized (at load, or on disk by llama-cli quantize) the output
    layer is the embeddings' int8 form, the same tensors at one process, and nothing is added to the file."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=3)
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    del sd["output.weight"]
    torch.save(sd, folder / "consolidated.00.pth")
    tok = str(folder / "tokenizer.model")
    at_load = Llama.build(str(folder), tok, 64, 2, quantize="int4")
    emb, out = at_load.model.tok_embeddings, at_load.model.output
    assert emb.weight is None and emb.qweight.dtype == torch.int8 and out.qweight is emb.qweight
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "q"), "--mode", "int4"]) == 0
    stored = torch.load(tmp_path / "q" / "consolidated.00.pth", weights_only=True)
    assert not any(k.startswith("output.") for k in stored)
    on_disk = Llama.build(str(tmp_path / "q"), tok, 64, 2)
    assert torch.equal(on_disk.model.output.qweight, emb.qweight)
    seq = torch.randint(3, on_disk.tokenizer.n_words, (2, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(on_disk.model(seq), at_load.model(seq))
    # a looked-up row is the dequantized row of the table
    rows = on_disk.model.tok_embeddings(seq[:1, :3])
    assert torch.equal(rows[0], dequantize(emb.qweight[seq[0, :3]], emb.qscale[seq[0, :3]], None))
    # on two processes: the embeddings split by columns, the output layer read from them split by rows
    from helpers import greedy, run_torchrun

    assert run_torchrun(2, tmp_path / "q", tmp_path / "tr")["greedy"] == greedy(tmp_path / "q")


def test_library_kernel_form_gives_the_same_model(tmp_path, spm_path):
    """The form CUDA's int4 kernel takes (tinygemm's packed int4 with scales and zeros, w = (v - 8) scale +
    zero), checked through its CPU twin: the same logits as dequantizing (fp32 on the CPU; CUDA's kernel
    takes bf16). The CUDA-only packing is gpu_check's to check. int8 layers keep their own product."""
    from llama_cli.quant import use_kernels

    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=2)
    tok = str(folder / "tokenizer.model")
    plain = Llama.build(str(folder), tok, 64, 2, quantize="int4")
    kern = Llama.build(str(folder), tok, 64, 2, quantize="int4")
    n = use_kernels(kern.model, torch.device("cpu"), rows=16)  # past 2 rows: tinygemm
    layers = [m for m in kern.model.modules() if getattr(m, "qweight", None) is not None and hasattr(m, "kernel")]
    assert n == len(layers) == 7 * BIG["n_layers"] + 1  # every linear layer, the output too
    assert {m.kernel for m in layers} == {"int4-cpu"}
    seq = torch.randint(3, plain.tokenizer.n_words, (2, 12), generator=torch.Generator().manual_seed(4))
    ref, got = plain.model(seq), kern.model(seq)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-4
    # a wrong zero point (tinygemm's zeros are offset + 8 scale) is caught by the comparison above
    kern.model.output.kscales[..., 1] -= 0.01
    assert ((kern.model(seq) - ref).abs().max() / ref.abs().max()) > 1e-3
    assert use_kernels(Llama.build(str(folder), tok, 64, 2, quantize="int8").model, torch.device("cpu"), rows=16) == 0


def test_int8_on_cuda_warns_when_not_compiled(tmp_path, spm_path, monkeypatch, caplog):
    """On a CUDA GPU int8 layers past 2 rows a step (no kernel there) are dequantized per step unless compiled:
    build says so and what to do; at 1-2 rows (our Triton kernel) and for int4 (tinygemm past 2 rows) it does
    not warn. (The CUDA branch, with the CPU twins of the kernels: build's device check is what is patched.)"""
    import logging

    import llama_cli.generation as generation

    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=2)
    tok = str(folder / "tokenizer.model")
    monkeypatch.setattr(generation, "is_cuda", lambda device: True)
    for mode, rows, warns in (("int8", 4, True), ("int8", 1, False), ("int4", 4, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llama_cli"):
            Llama.build(str(folder), tok, 64, rows, quantize=mode, compile="off")
        if warns:
            assert "--max_batch_size 4, not compiled" in caplog.text and "--max_batch_size 1 or 2" in caplog.text
            assert "--quantize int4" in caplog.text and "Triton" in caplog.text
        else:
            assert "dequantized on every step" not in caplog.text, (mode, rows)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_cli"):  # perplexity: no decode steps, nothing to say
        Llama.build(str(folder), tok, 64, 4, quantize="int8", compile="off", expected_tokens=0)
    assert "dequantized on every step" not in caplog.text
    import llama_cli.triton_gemv as triton_gemv

    monkeypatch.setattr(triton_gemv, "available", lambda: False)  # (or a GPU older than sm_80): compiling is the way
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_cli"):
        Llama.build(str(folder), tok, 64, 1, quantize="int8", compile="off")
    assert "--compile on with --max_batch_size 1 or 2" in caplog.text


def test_dequantize_as_is_dequantize_in_one_pass(monkeypatch):
    """quant.dequantize_as (the prefill of layers on the Triton kernels: tables in the activations' half type):
    the weight dequantize gives from the same tables, up to dequantize's second rounding (fp32, then the half
    type); and uncompiled quantized_linear in bf16/fp16 with such tables takes it, fp32 activations do not."""
    from llama_cli import quant

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen)
    for mode, group in (("int4", 32), ("int4", 128), ("int8", 64)):
        for dtype in (torch.bfloat16, torch.float16):
            q, s, m = quantize(w, mode, group)
            s, m = s.to(dtype), None if m is None else m.to(dtype)
            got, want = quant.dequantize_as(q, s, m), dequantize(q, s, m, dtype)
            assert got.dtype == dtype and got.shape == want.shape
            exact = dequantize(q, s, m).to(torch.float64)  # v * scale + offset, then one rounding to fp64's
            ulp = want.float().abs().clamp_min(1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
            assert ((got.float() - want.float()).abs() <= ulp).all(), (mode, group, dtype)
            assert (got == want).float().mean() > 0.99
            assert ((got.double() - exact).abs() <= (want.double() - exact).abs() + 1e-12).all()
    q, s, m = quantize(w, "int4", 32)
    x = torch.randn(3, 256, generator=gen)
    calls = []
    monkeypatch.setattr(quant, "dequantize_as", lambda *a: calls.append(1) or dequantize(*a, a[1].dtype))
    quant.quantized_linear(x.bfloat16(), q, s.bfloat16(), m.bfloat16(), 0)
    quant.quantized_linear(x, q, s, m, 0)
    quant.quantized_linear(x.bfloat16(), q, s, m, 0)  # fp32 tables: dequantize
    assert calls == [1]


def test_cuda_forms_follow_the_batch_size(tmp_path, spm_path, monkeypatch, caplog):
    """Which CUDA kernel a quantized layer takes (quant.cuda_forms, measured on an H100): our Triton kernels
    where decode steps have 1-2 rows (int4 346 tok/s against tinygemm's 206 at the 7B shape, int8 248 against
    38 dequantizing), past them tinygemm for int4 (any row count) and int8's compiled product; without Triton,
    on GPUs older than sm_80 or AMD's, the library forms; the knobs CUDA_INT4 / CUDA_INT8 override "auto"."""
    import logging

    import llama_cli.generation as generation
    import llama_cli.triton_gemv as triton_gemv
    from llama_cli import quant
    from llama_cli.parallel import _Linear

    assert triton_gemv.available()  # a test dependency
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=2)
    tok = str(folder / "tokenizer.model")
    monkeypatch.setattr(generation, "is_cuda", lambda device: True)

    def kinds(mode, rows, **kw):
        llama = Llama.build(str(folder), tok, 64, rows, quantize=mode, compile="off", **kw)
        return {str(m.kernel) for m in llama.model.modules() if isinstance(m, _Linear) and m.qweight is not None}

    with caplog.at_level(logging.INFO, logger="llama_cli"):
        assert kinds("int4", 1) == {"int4-triton"}
    assert "use a GPU kernel (int4: triton, int8: triton)" in caplog.text
    assert kinds("int4", 2, group_size=128) == {"int4-triton"}
    assert kinds("int4", 3) == {"int4-cpu"}  # tinygemm's CPU twin
    assert kinds("int8", 2) == {"int8-triton"}
    assert kinds("int8", 3) == {"None"}  # quantized_linear, dequantizing unless compiled
    assert quant.cuda_forms(2) == ("triton", "triton") and quant.cuda_forms(3) == ("tinygemm", "compiled")
    import llama_cli.devices as devices

    gpu = torch.device("cpu")  # a stand-in: is_cuda and the capability are patched
    with monkeypatch.context() as m:
        m.setattr(devices, "is_cuda", lambda device: True)
        for cap, hip, want in (((9, 0), None, "triton"), ((8, 0), None, "triton"), ((7, 5), None, "tinygemm"),
                               ((9, 0), "6.2", "tinygemm")):
            m.setattr(torch.cuda, "get_device_capability", lambda device, cap=cap: cap)
            m.setattr(torch.version, "hip", hip)
            assert quant.cuda_forms(1, gpu)[0] == want, (cap, hip)
    monkeypatch.setattr(triton_gemv, "available", lambda: False)
    assert quant.cuda_forms(1) == ("tinygemm", "compiled")
    assert kinds("int4", 1) == {"int4-cpu"} and kinds("int8", 1) == {"None"}
    monkeypatch.undo()
    monkeypatch.setattr(generation, "is_cuda", lambda device: True)
    monkeypatch.setattr(quant, "CUDA_INT4", "tinygemm")
    monkeypatch.setattr(quant, "CUDA_INT8", "compiled")
    assert kinds("int4", 1) == {"int4-cpu"} and kinds("int8", 1) == {"None"}


def test_int4_fused_form_for_cuda(tmp_path, spm_path, monkeypatch):
    """quant.CUDA_INT4 = "fused" (gpu_check's candidate to tinygemm): the int4 layers keep our form, tables in
    the activations' dtype, no library kernel; compiled, one fused multiply-and-sum per product (run here on
    the CPU in bf16, the CUDA branch patched in as in the test above): the eager model's greedy tokens, and
    eager it is the model on the dequantized weights with those tables."""
    from helpers import assert_same_or_near_tie

    import llama_cli.generation as generation
    import llama_cli.quant as quant

    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=8)
    tok = str(folder / "tokenizer.model")
    monkeypatch.setattr(generation, "is_cuda", lambda device: True)
    monkeypatch.setattr(quant, "CUDA_INT4", "fused")
    kw = dict(quantize="int4", group_size=32, dtype="bf16")
    eager = Llama.build(str(folder), tok, 64, 1, compile="off", **kw)
    compiled = Llama.build(str(folder), tok, 64, 1, compile="on", **kw)
    wq = compiled.model.layers[0].attention.wq
    assert wq.kernel is None and wq.qscale.dtype == wq.qoffset.dtype == torch.bfloat16
    assert compiled.engine.compiled
    seq = torch.randint(3, eager.tokenizer.n_words, (1, 12), generator=torch.Generator().manual_seed(5))
    w = dequantize(wq.qweight, wq.qscale, wq.qoffset, torch.bfloat16)
    x = torch.randn(1, 1, BIG["dim"], generator=torch.Generator().manual_seed(6)).bfloat16()
    assert torch.equal(wq(x), torch.nn.functional.linear(x, w))  # eager: dequantized with the bf16 tables
    ids = seq[0].tolist()
    a = eager.generate([ids], max_gen_len=16, temperature=0)[0][0]
    b = compiled.generate([ids], max_gen_len=16, temperature=0)[0][0]
    assert_same_or_near_tie(eager, ids, b, a)


def test_triton_kernels_in_the_interpreter(tmp_path, spm_path):
    """llama_cli/triton_gemv.py (quant.CUDA_INT4 / CUDA_INT8 "triton": gpu_check's candidates) run by Triton's
    interpreter on the CPU (tests/triton_worker.py): int4 and int8 per row, the dequantized weight's product
    within fp32's and bf16's rounding, ragged output, group and input counts included, in the activations'
    dtype; and int4 and int8 models on them give the dequantizing models' greedy tokens. (The GPU's compiled
    kernels: gpu_check.)"""
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    env = {**subprocess_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "triton_worker.py"), str(tmp_path), spm_path],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    kinds = sorted({(r["kernel"], r["x_tile"]) for r in res["kernel"]})
    assert kinds == [("int4", 0), ("int4", 1), ("int8", 0), ("int8", 1)]
    for r in res["kernel"]:
        assert r["out_dtype"] == r["dtype"]
        assert r["err"] < (1e-5 if r["dtype"] == "torch.float32" else 1e-2), r
    # every linear layer on its kernel (the output layer too); None: the int8 embeddings, a lookup
    assert res["int4"]["kinds"] == ["None", "int4-triton"]
    assert res["int8"]["kinds"] == ["None", "int8-triton"]
    for m in (res["int4"], res["int8"]):
        assert m["same_tokens"] and m["one_row_err"] < 1e-5


def test_triton_kernels_compile_for_a_gpu(monkeypatch):
    """Both Triton kernels compiled for an H100 (sm_90) and an A100 (sm_80) by Triton's own compiler and the
    ptxas inside its wheel (no GPU needed), for the arguments int4_rows and int8_rows pass at the 7B shape, as
    the JIT specializes them (integers divisible by 16 and 16-byte aligned pointers marked so), in every
    configuration the autotuner tries (at the first shape; sm_80: the first configuration): each compiles, and
    loads the weights 16 bytes at a time, never a byte at a time (int4 loaded 8 at a time while the kernel
    computed its row length as K // 2), with fused multiply-adds (asked for at each launch: Triton 3.10 stops
    fusing by default)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llama_cli import triton_gemv as tg

    from helpers import record_launches

    calls = record_launches(monkeypatch, tg, ("_int4_rows", "_int8_rows"))
    for n, k, g in ((11008, 4096, 32), (4096, 11008, 32), (4096, 4096, 128)):
        q, s, m = quantize(torch.zeros(n, k), "int4", g)
        tg.int4_rows(torch.zeros(1, k, dtype=torch.bfloat16), q, s.bfloat16(), m.bfloat16())
    for n, k in ((11008, 4096), (4096, 11008)):
        q, s, _ = quantize(torch.zeros(n, k), "int8", 0)
        tg.int8_rows(torch.zeros(1, k, dtype=torch.bfloat16), q, s.bfloat16())
    types = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8"}
    compiled, seen = 0, set()
    for kernel, args, kw, options in calls:
        assert options == tg.FP_FUSION
        sig, attrs = {}, {}
        for i, (name, v) in enumerate(zip(kernel.fn.arg_names, args)):
            is_tensor = isinstance(v, torch.Tensor)
            sig[name] = "*" + types[v.dtype] if is_tensor else "i32"
            if (v.data_ptr() if is_tensor else v) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        # every configuration at a kernel's first shape; at the others, the first of each way x is loaded
        first = kernel not in seen
        seen.add(kernel)
        configs = kernel.configs if first else [next(c for c in kernel.configs if c.kwargs["X_TILE"] == t)
                                                for t in (0, 1)]
        for cfg in configs:
            consts = {**kw, **cfg.kwargs}
            src = ASTSource(fn=kernel.fn, signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts,
                            attrs=attrs)
            for arch in (90, 80) if first and cfg is configs[0] else (90,):
                ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                     options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                              **options}).asm["ptx"]
                assert "fma.rn.f32" in ptx, (kernel.fn.__name__, arch, cfg)
                loads = set(re.findall(r"ld\.global(?:\.\w+)*", ptx))
                assert "ld.global.v4.b32" in loads, (kernel.fn.__name__, arch, cfg, loads)
                assert not [ld for ld in loads if re.search(r"\.[bus]8$", ld)], (kernel.fn.__name__, arch, cfg, loads)
                compiled += 1
    assert compiled == len(tg.INT4_CONFIGS) + 2 * 2 + len(tg.INT8_CONFIGS) + 2 + 2


def test_quantize_refusals(tmp_path, spm_path, capsys):
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY)
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "a"), "--mode", "int4",
                "--group_size", "128"]) == 2
    assert "--group_size 128 does not divide the input size 64" in capsys.readouterr().err
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "b"), "--mode", "int2"]) == 2
    assert "--mode must be int8 or int4, got 'int2'" in capsys.readouterr().err  # the flag as this command names it
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "b"), "--mode", "int4",
                "--group_size", "48"]) == 2
    assert "--group_size for int4 must be one of 32, 64, 128, 256" in capsys.readouterr().err
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "b"), "--mode", "int8",
                "--shards", "0"]) == 2  # not taken for the default
    assert "--shards must be a positive integer, got 0" in capsys.readouterr().err
    assert cli(["quantize", "--ckpt_dir", str(folder), "--out", str(tmp_path / "c"), "--mode", "int8"]) == 0
    capsys.readouterr()
    assert cli(["quantize", "--ckpt_dir", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--mode", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert cli(["--ckpt_dir", str(tmp_path / "c"), "--prompt", "Hi", "--quantize", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    for where, bad, said in [((), {"mode": "int3"}, "params.json: quantization.mode must be int8 or int4, got 'int3'"),
                             (("embeddings",), {"group_size": 48},
                              "params.json: quantization.embeddings.group_size for int8 must be one of 0, 32")]:
        changed = json.loads(json.dumps(params))
        part = changed["quantization"]
        for key in where:
            part = part[key]
        part.update(bad)
        (tmp_path / "c" / "params.json").write_text(json.dumps(changed))
        assert cli(["--ckpt_dir", str(tmp_path / "c"), "--prompt", "Hi"]) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "c" / "params.json").write_text(json.dumps(params))
    sd = torch.load(tmp_path / "c" / "consolidated.00.pth", weights_only=True)  # values stored in another type
    sd["layers.0.feed_forward.w1.weight.q"] = sd["layers.0.feed_forward.w1.weight.q"].float()
    torch.save(sd, tmp_path / "c" / "consolidated.00.pth")
    assert cli(["--ckpt_dir", str(tmp_path / "c"), "--prompt", "Hi"]) == 2
    assert "'layers.0.feed_forward.w1.weight.q' in consolidated.00.pth holds float32 values where int8 or uint8 " \
        "(quantized) values belong" in capsys.readouterr().err
    # hidden size 192: groups of 64 make 3 a row, which 2 shards would cut
    wide, _ = make_model_folder(tmp_path / "w", spm_path, {**TINY, "n_kv_heads": 4, "multiple_of": 64})
    e = tmp_path / "e"
    assert cli(["quantize", "--ckpt_dir", str(wide), "--out", str(e), "--mode", "int4", "--group_size", "64",
                "--shards", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'layers.0.feed_forward.w2.weight.scale' has 3 along the dimension shards " \
        "split; it does not divide into 2 shards (quantization groups are never cut); write fewer shards " \
        "(--shards 1 always works)" in err, err
    assert not list(e.glob("consolidated.*")) and not (e / "params.json").exists()  # nothing half-written
    assert cli(["quantize", "--ckpt_dir", str(wide), "--out", str(e), "--mode", "int4", "--group_size", "64",
                "--shards", "1"]) == 0
