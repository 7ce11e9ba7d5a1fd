"""The decode engine: cache writes and reads agree with recomputing from scratch, batched prefills
agree with one at a time, steps cost what the live tokens need, and the static-buffer (CUDA graph)
logic keeps live rows intact. All on the CPU; scripts/gpu_check.py runs the same on a GPU."""

import pytest
import torch

from helpers import TINY, model_args, random_weights
from llama_cli.engine import MIN_BUCKET, Engine, length_buckets
from llama_cli.model import Transformer, apply_rotary

VOCAB = 320


def model(seed=2, **over):
    params = {**TINY, **over}
    with torch.device("meta"):
        m = Transformer(model_args(params, VOCAB))
    m.load_state_dict(random_weights(params, VOCAB, seed=seed), assign=True)
    return m.requires_grad_(False)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def seq():
    return torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))


def test_prefill_then_decode_equals_recompute(seq):
    m = model()
    eng = Engine(m, 4, 64)
    full = m.prefill(seq)  # (3, 40, vocab) from scratch
    eng.prefill([0, 1, 2], [s[:10].tolist() for s in seq])
    for pos in range(10, 40):
        step = eng.decode(seq[:, pos], [pos] * 3)
        assert rel_err(step, full[:, pos]) < 1e-5, pos


def test_rows_at_their_own_positions(seq):
    """Continuous batching: rows hold prompts of different lengths, each decoding at its own position."""
    m = model()
    eng = Engine(m, 4, 64)
    full = m.prefill(seq)
    lengths = [7, 19, 12]
    eng.prefill([0, 1, 2], [s[:n].tolist() for s, n in zip(seq, lengths)])  # one ragged batch
    for k in range(15):
        pos = [n + k for n in lengths]
        step = eng.decode(torch.stack([seq[i, p] for i, p in enumerate(pos)]), pos)
        for i, p in enumerate(pos):
            assert rel_err(step[i], full[i, p]) < 1e-5


@pytest.mark.parametrize("kv_heads", [None, 1])
@pytest.mark.parametrize("packed", [True, False])
def test_batched_ragged_prefill_equals_one_at_a_time(seq, monkeypatch, packed, kv_heads):
    """Prompts of different lengths prefilled together, on the CPU packed into one row (none padded), else
    (all_logits, or as on a GPU) padded to the longest: the same logits and cache rows as one at a time."""
    m = model(**({} if kv_heads is None else {"n_kv_heads": kv_heads}))
    eng = Engine(m, 4, 64)
    calls = []
    monkeypatch.setattr(m, "prefill_packed", lambda *a: calls.append(a) or Transformer.prefill_packed(m, *a))
    if not packed:  # the padded path, as where the device is not the CPU
        eng.pack_prefills = False
    prompts = [seq[0, :5].tolist(), seq[1, :23].tolist(), seq[2, :1].tolist()]
    together = eng.prefill([3, 0, 2], prompts)
    assert len(calls) == packed
    for i, p in enumerate(prompts):
        alone = m.prefill(torch.tensor([p]))[0]
        assert rel_err(together[i], alone[-1]) < 1e-5
    # the prefilled rows hold each prompt's cache: decoding the next token from row 3 continues prompt 0
    ref0, ref1 = m.prefill(seq[:1, :6])[0, -1], m.prefill(seq[1:2, :24])[0, -1]
    eng.prefill([3, 0, 2], prompts)
    eng.move_row(3, 1)  # and a moved row carries its cache with it
    step = eng.decode(torch.stack([seq[1, 23], seq[0, 5]]), [23, 5])
    assert rel_err(step[0], ref1) < 1e-5 and rel_err(step[1], ref0) < 1e-5
    every = eng.prefill([3, 0, 2], prompts, all_logits=True)  # every position's logits: padded
    assert len(calls) == 2 * packed
    for i, p in enumerate(prompts):
        alone = m.prefill(torch.tensor([p]))[0]
        assert every[i].shape == alone.shape and rel_err(every[i], alone) < 1e-5


def test_decode_reads_only_the_live_part_of_the_cache(seq):
    """A step attends over max(position) + 1 cache positions, whatever max_seq_len is: positions beyond
    hold garbage here, and the result must not change."""
    m = model()
    eng = Engine(m, 2, 4096)
    eng.prefill([0, 1], [s[:10].tolist() for s in seq[:2]])
    for layer in m.layers:
        layer.attention.cache_k[:, :, 11:].normal_()
        layer.attention.cache_v[:, :, 11:].normal_()
    step = eng.decode(seq[:2, 10], [10, 10])
    assert rel_err(step, m.prefill(seq[:2, :11])[:, -1]) < 1e-5


def test_length_buckets():
    assert length_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert length_buckets(300) == [256, 320]  # the cache is a whole number of 64-position blocks
    assert length_buckets(100) == [128]
    assert MIN_BUCKET == 256


def test_static_buffer_steps_equal_eager_and_keep_live_rows(seq):
    """The CUDA-graph logic (static buffers, rows padded to a power of two, a cache length bucket, warm-up
    runs at the bucket's last position) run eagerly on the CPU: the same tokens as the eager engine, also
    when a new bucket is captured while rows are live, and padding rows never touch live ones."""
    seq = torch.randint(3, VOCAB, (3, 300), generator=torch.Generator().manual_seed(3))
    a, b = model(), model()
    eager, graphs = Engine(a, 4, 320), Engine(b, 4, 320, cuda_graphs=True)
    lengths = [250, 240, 230]
    for eng in (eager, graphs):
        eng.prefill([0, 1, 2], [s[:n].tolist() for s, n in zip(seq, lengths)])
    for k in range(30):  # rows cross position 256: a second bucket (320) is set up mid-run
        pos = [n + k for n in lengths]
        toks = torch.stack([seq[i, p] for i, p in enumerate(pos)])
        x, y = eager.decode(toks, pos), graphs.decode(toks, pos)
        assert rel_err(y, x) < 1e-5, k
    assert set(graphs._graphs) == {(4, 256), (4, 320)}  # 3 rows padded to 4; two buckets
    # two rows only: a graph of 2 rows, and row 2's cache untouched by it
    before = b.layers[0].attention.cache_k[2].clone()
    graphs.decode(seq[:2, 280], [280, 270])
    assert (2, 320) in graphs._graphs
    assert torch.equal(b.layers[0].attention.cache_k[2], before)


def test_prefill_graphs_pad_and_keep_live_rows():
    """The prefill-graph logic (engine._PrefillGraph: static buffers, prompts padded to a power-of-two length,
    captured at a shape's second use, the warm-up runs writing the creating call's rows) run eagerly on the
    CPU: the same logits and cache contents as the eager engine's prefill, rows not prefilled untouched,
    one graph per (prompts, padded length), none for a shape used once, three prompts or all_logits."""
    from llama_cli.engine import PREFILL_MIN

    seq = torch.randint(3, VOCAB, (4, 300), generator=torch.Generator().manual_seed(6))
    a, b = model(), model()
    eager, graphs = Engine(a, 4, 320), Engine(b, 4, 320, cuda_graphs=True)
    for eng in (eager, graphs):  # a live row 3 beside the refills
        eng.prefill([3], [seq[3, :50].tolist()])
    live = b.layers[0].attention.cache_k[3].clone()
    calls = [([0], [37]), ([1], [40]), ([2], [33]), ([0, 2], [5, 9]), ([1, 2], [7, 3]), ([0], [300]),
             ([0, 1, 2], [4, 5, 6])]
    for rows, lengths in calls:
        prompts = [seq[r, :n].tolist() for r, n in zip(rows, lengths)]
        x, y = eager.prefill(rows, prompts), graphs.prefill(rows, prompts)
        assert rel_err(y, x) < 1e-5, (rows, lengths)
        for r, n in zip(rows, lengths):
            for m, eng_m in ((b, a),):
                got, want = m.layers[1].attention.cache_v[r, :, :n], eng_m.layers[1].attention.cache_v[r, :, :n]
                assert rel_err(got, want) < 1e-5
    assert set(graphs._prefill_graphs) == {(1, 64), (2, PREFILL_MIN)}  # 37, 40, 33 -> 64; 9, 7 -> 16
    assert torch.equal(b.layers[0].attention.cache_k[3], live)
    assert graphs._prefill_uses[(1, 320)] == 1  # 300 tokens: the cache's length, used once: eager
    x = graphs.prefill([0], [seq[0, :37].tolist()], all_logits=True)[0]
    assert x.shape == (37, VOCAB)


def test_rotary_eager_and_compiled_forms_agree():
    x = torch.randn(2, 5, 3, 8)
    ang = torch.randn(2, 5, 4)
    eager = apply_rotary(x, ang.cos(), ang.sin())
    compiled = torch.compile(apply_rotary, fullgraph=True)(x, ang.cos(), ang.sin())
    # the real form, by hand: pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
    assert rel_err(eager, want) < 1e-6 and rel_err(compiled, want) < 1e-6


def test_attention_without_cudnn_gives_the_same_steps(seq, monkeypatch):
    """On CUDA the engine keeps cuDNN's attention out (a plan per new shape: hundreds of ms each); the
    backends it allows give the same prefill and steps (checked here with the CPU's)."""
    import llama_cli.engine as engine

    m = model()
    plain = Engine(m, 4, 64)
    want = [plain.prefill([0, 1], [s[:9].tolist() for s in seq[:2]])]
    want += [plain.decode(seq[:2, p], [p, p]) for p in range(9, 14)]
    eng = Engine(m, 4, 64)
    eng._attention = engine._no_cudnn_attention
    got = [eng.prefill([0, 1], [s[:9].tolist() for s in seq[:2]])]
    got += [eng.decode(seq[:2, p], [p, p]) for p in range(9, 14)]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    with engine._no_cudnn_attention():  # the context really restricts the choice
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("packed", [True, False])
def test_the_batching_bench_counts_the_products_torch_counts(monkeypatch, packed):
    """scripts/bench_batching.py's arithmetic (Work) against torch's own FLOP counter over the same engine calls
    (PyTorch's products, no native step): its matrix products exactly, ragged prompts packed or padded."""
    import sys
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.delitem(sys.modules, "bench_batching", raising=False)
    from bench_batching import Work

    m = model()
    eng = Engine(m, 4, 64)
    eng.native, eng.pack_prefills = None, packed
    with Work(eng) as work, FlopCounterMode(display=False) as counter:
        eng.prefill([0, 1, 2], [[5] * 7, [6] * 13, [7] * 3])
        eng.decode(torch.tensor([1, 2, 3]), [7, 13, 3])
        eng.decode(torch.tensor([1, 2]), [8, 14])
    got = work.gflop(m.params)
    assert (got["decode_rows"], got["prefill_tokens"]) == (5, 23 if packed else 39)
    assert round(got["products_gflop"] * 1e9) == counter.get_flop_counts()["Global"][torch.ops.aten.mm]


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_a_prompt_after_a_copied_beginning_equals_it_whole(seq, kv_heads):
    """prefill_after: rows whose first n positions are copied from another row's cache, the rest of their
    prompts prefilled after them in one packed call: the same last-token logits as HF transformers' forward pass
    over each whole prompt (an independent implementation), and rows that decode on as the whole prompt would."""
    from helpers import to_hf

    params = {**TINY, **({} if kv_heads is None else {"n_kv_heads": kv_heads})}
    weights = random_weights(params, VOCAB, seed=2)
    m = model(**({} if kv_heads is None else {"n_kv_heads": kv_heads}))
    hf = to_hf(params, weights, VOCAB)
    eng = Engine(m, 4, 64)
    head = seq[0, :20].tolist()
    eng.prefill([2], [head + seq[1, :5].tolist()])  # row 2 holds the shared beginning, then its own tokens
    prompts = [head + seq[2, :9].tolist(), head[:12] + seq[1, 30:31].tolist(), head[:19] + [head[19]]]
    starts = [(2, 20), (2, 12), (2, 19)]
    got = eng.prefill_after([0, 1, 3], starts, [p[n:] for p, (_, n) in zip(prompts, starts)])
    with torch.no_grad():
        for i, p in enumerate(prompts):
            want = hf(torch.tensor([p])).logits[0, -1]
            assert rel_err(got[i], want) < 1e-4, i
            assert rel_err(got[i], m.prefill(torch.tensor([p]))[0, -1]) < 1e-5
    step = eng.decode(torch.tensor([7, 8]), [len(prompts[0]), len(prompts[1])])  # rows 0 and 1 decode on
    for i in range(2):
        with torch.no_grad():
            want = hf(torch.tensor([prompts[i] + [7 + i]])).logits[0, -1]
        assert rel_err(step[i], want) < 1e-4
