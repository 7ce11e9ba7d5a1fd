"""The CPU decode step as one native call per layer (llama_cli/cpu_step.py, csrc/decode_layer.h): its logits
are the model's recomputed from scratch and the plain eager layers', for int4, int8 and dense weights (fp32, or
bf16/fp16 as a checkpoint stored them), grouped-query and multi-head attention, rows at their own positions; it
is used exactly where it applies.
(Greedy generation through it against HF transformers: test_model.py.)"""

import logging

import pytest
import torch

from helpers import TINY, make_model_folder
from llama_cli import Llama
from llama_cli.cpu_step import NativeStep

BIG = {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 128}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


STORED = {"bf16": torch.bfloat16, "fp16": torch.float16}  # dense weights kept as stored, fp32 activations


def build_for(tmp_path, spm_path, mode, params, seed, *args, **kw):
    """A model with int4/int8 weights (quantized at load), dense fp32 ones (mode None), or dense bf16/fp16 ones
    kept as a checkpoint stored them."""
    stored = STORED.get(mode, torch.float32)
    folder, _ = make_model_folder(tmp_path / "m", spm_path, params, seed=seed, dtype=stored)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), *args,
                        quantize=None if mode in STORED else mode, **kw)
    if mode in STORED:
        assert llama.model.layers[0].feed_forward.w2.weight.dtype == STORED[mode]
        assert llama.model.norm.weight.dtype == torch.float32
    return llama


@pytest.mark.parametrize("mode,rows", [("int4", 36), ("int8", 34), (None, 18), ("bf16", 17), ("fp16", 20)])
def test_native_step_with_many_rows(tmp_path, spm_path, ops, mode, rows):
    """Past the kernels' few rows (32 quantized, 8 fp32, 12 bf16/fp16, 16 dense for narrow weights as these) the
    products go to PyTorch's matrix product (the weight widened or dequantized first): the same logits, rows at
    their own positions."""
    llama = build_for(tmp_path, spm_path, mode, BIG, 7, 64, rows)
    eng, model = llama.engine, llama.model
    seq = torch.randint(3, 300, (rows, 20), generator=torch.Generator().manual_seed(3))
    full = model.prefill(seq)
    lengths = [3 + i % 11 for i in range(rows)]
    eng.prefill(list(range(rows)), [s[:n].tolist() for s, n in zip(seq, lengths)])
    for k in range(3):
        pos = [n + k for n in lengths]
        step = eng.decode(torch.stack([seq[i, p] for i, p in enumerate(pos)]), pos)
        assert eng.native is not None
        assert max(rel_err(step[i], full[i, p]) for i, p in enumerate(pos)) < 1e-4


@pytest.mark.parametrize("mode", ["int4", "int8", None, "bf16", "fp16"])
@pytest.mark.parametrize("params", [BIG, {**BIG, "n_kv_heads": None}, {**BIG, "n_kv_heads": 1}],
                         ids=["gqa", "mha", "mqa"])
def test_native_step_equals_recomputing_and_the_eager_layers(tmp_path, spm_path, ops, mode, params):
    llama = build_for(tmp_path, spm_path, mode, params, 3, 96, 4, compile="off")
    eng, model = llama.engine, llama.model
    assert isinstance(eng.native, NativeStep)
    seq = torch.randint(3, 300, (3, 60), generator=torch.Generator().manual_seed(1))
    full = model.prefill(seq)  # (3, 60, vocab) from scratch, through the eager layers
    lengths = [5, 31, 17]  # continuous batching: each row at its own position
    eng.prefill([0, 1, 2], [s[:n].tolist() for s, n in zip(seq, lengths)])
    calls = []
    real = eng.native.op
    eng.native.op = lambda *a: calls.append(1) or real(*a)
    for k in range(25):
        pos = [n + k for n in lengths]
        tokens = torch.stack([seq[i, p] for i, p in enumerate(pos)])
        step = eng.decode(tokens, pos)
        for i, p in enumerate(pos):
            assert rel_err(step[i], full[i, p]) < 1e-4, (k, i)
        if k % 8 == 0:  # the plain eager layers on the same cache give the same logits (and rewrite the same entries)
            plain = model.decode(tokens, torch.tensor(pos), max(pos) + 1, eager=True)
            assert rel_err(step, plain) < 1e-5
    assert len(calls) == 25 * BIG["n_layers"]  # one native call per layer and step, nothing else


@pytest.mark.parametrize("params", [BIG, {**BIG, "n_heads": 16, "n_kv_heads": 1}], ids=["gqa", "mqa-16"])
def test_native_step_over_long_rows(tmp_path, spm_path, ops, params):
    """Rows past the attention's spans of 256 positions (split over threads, merged per head), and 16 query
    heads sharing one key/value head: the logits of recomputing from scratch."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, params, seed=8)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 1024, 2, quantize="int4")
    seq = torch.randint(3, 300, (2, 720), generator=torch.Generator().manual_seed(5))
    full = llama.model.prefill(seq)
    lengths = [700, 255]
    llama.engine.prefill([0, 1], [seq[0, :700].tolist(), seq[1, :255].tolist()])
    for k in range(4):  # row 1 crosses from one span to two
        pos = [n + k for n in lengths]
        step = llama.engine.decode(torch.stack([seq[0, pos[0]], seq[1, pos[1]]]), pos)
        assert max(rel_err(step[i], full[i, p]) for i, p in enumerate(pos)) < 1e-4


def test_native_step_reads_only_each_rows_positions(tmp_path, spm_path, ops):
    """Cache positions past a row's own hold garbage here, and nothing changes: a row reads its positions only."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=4)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 4096, 2, quantize="int4", compile="off")
    seq = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    llama.engine.prefill([0, 1], [seq[0, :10].tolist(), seq[1, :6].tolist()])
    for layer in llama.model.layers:
        layer.attention.cache_k[0, :, 11:].normal_()
        layer.attention.cache_k[1, :, 7:].normal_()
        layer.attention.cache_v[:, :, 11:].normal_()
    step = llama.engine.decode(torch.stack([seq[0, 10], seq[1, 6]]), [10, 6])
    assert rel_err(step[0], llama.model.prefill(seq[:1, :11])[0, -1]) < 1e-4
    assert rel_err(step[1], llama.model.prefill(seq[1:, :7])[0, -1]) < 1e-4


def test_native_step_is_used_where_it_applies(tmp_path, spm_path, ops, monkeypatch, caplog):
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=5)
    tok = str(folder / "tokenizer.model")
    ids = [1, 20, 30, 40]

    def build(**kw):
        return Llama.build(str(folder), tok, 64, kw.pop("batch", 1), **kw)

    assert build(quantize="int4").engine.native is not None  # auto: not compiled, the native step instead
    compiled = build(quantize="int4", compile="on", batch=4)  # asked to compile: 1-2 rows compiled, more native
    calls = []
    real = compiled.engine.native.op
    compiled.engine.native.op = lambda *a: calls.append(len(a[0])) or real(*a)
    compiled.generate([ids], max_gen_len=3, temperature=0)
    assert calls == []
    compiled.generate([ids] * 3, max_gen_len=3, temperature=0)
    assert set(calls) == {3}
    with caplog.at_level(logging.WARNING, logger="llama_cli"):
        assert build(dtype="bf16").engine.native is None  # its products are fp32
    assert "--dtype bf16 on the CPU computes in bf16 without our kernels" in caplog.text
    monkeypatch.setenv("LLAMA_CLI_NATIVE", "0")
    assert build(quantize="int4").engine.native is None


def test_native_step_refuses_what_it_cannot_run(tmp_path, spm_path, ops):
    """Positions outside the cache (the engine never asks for them), and mismatched weights: a clear error."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, BIG, seed=6)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1, quantize="int4")
    step = llama.engine.native
    with pytest.raises(RuntimeError, match="outside the cache"):
        step(torch.tensor([5]), torch.tensor([64]))
    layer, parts, an, fn, eps = step.layers[0]
    a = layer.attention
    x = torch.zeros(1, BIG["dim"])
    wq, wk, wv, wo, w1, w3, w2 = parts
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        step.op(x, wq, wk, wv, wo, w2, w3, w2, an, fn, eps,  # w2's shape where w1's belongs
                a.cache_k, a.cache_v, torch.tensor([0]), llama.model.rope_cos, llama.model.rope_sin)
    with pytest.raises(RuntimeError, match="uint8"):
        step.op(x, [wq[0].view(torch.int8), *wq[1:]], wk, wv, wo, w1, w3, w2, an, fn, eps,
                a.cache_k, a.cache_v, torch.tensor([0]), llama.model.rope_cos, llama.model.rope_sin)


@pytest.mark.parametrize("kv", ["bf16", "fp16"])
@pytest.mark.parametrize("params", [BIG, {**BIG, "n_heads": 16, "n_kv_heads": 1}], ids=["gqa", "mqa-16"])
def test_a_half_width_kv_cache(tmp_path, spm_path, ops, kv, params):
    """--kv_cache_dtype bf16/fp16 under fp32 activations: the cache holds the keys and values rounded to its type
    (as torch rounds); the native step (rows at their own positions, one past a 256-position span) gives the eager
    layers' logits on that cache, and both stay within the rounding's reach of the fp32 cache's logits."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, params, seed=6)
    tok = str(folder / "tokenizer.model")
    half = Llama.build(str(folder), tok, 512, 2, compile="off", kv_cache_dtype=kv)
    exact = Llama.build(str(folder), tok, 512, 2, compile="off")
    assert half.model.layers[0].attention.cache_k.dtype == STORED[kv] and isinstance(half.engine.native, NativeStep)
    seq = torch.randint(3, 300, (2, 320), generator=torch.Generator().manual_seed(4))
    lengths = [300, 40]
    for m in (half, exact):
        m.engine.prefill([0, 1], [s[:n].tolist() for s, n in zip(seq, lengths)])
    for a, b in zip(half.model.layers, exact.model.layers):  # the prefill's entries: fp32's, rounded
        assert torch.equal(a.attention.cache_k[0, :, :300], b.attention.cache_k[0, :, :300].to(STORED[kv]))
        assert torch.equal(a.attention.cache_v[1, :, :40], b.attention.cache_v[1, :, :40].to(STORED[kv]))
    worst = 0.0
    for k in range(4):
        pos = [n + k for n in lengths]
        tokens = torch.stack([seq[i, p] for i, p in enumerate(pos)])
        step = half.engine.decode(tokens, pos)
        plain = half.model.decode(tokens, torch.tensor(pos), max(pos) + 1, eager=True)  # rewrites the same entries
        assert rel_err(step, plain) < 1e-5
        worst = max(worst, rel_err(step, exact.engine.decode(tokens, pos)))
    assert 0 < worst < (5e-3 if kv == "bf16" else 1e-3)  # bf16 keeps 8 bits of mantissa, fp16 11
