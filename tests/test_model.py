"""The model against an independent implementation (HF transformers) on the same weights."""

import pytest
import torch

from helpers import TINY, assert_greedy_matches, model_args, random_weights, to_hf
from llama_cli import Llama, native
from llama_cli.model import Transformer, ffn_hidden_dim

REL_TOL = 1e-4


def build_local(params, weights, vocab, max_seq_len=256, max_batch_size=4, dtype=torch.float32):
    with torch.device("meta"):
        model = Transformer(model_args(params, vocab))
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    model.allocate_cache(max_batch_size, max_seq_len)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("params", [
    TINY,
    {**TINY, "n_kv_heads": 1, "rope_theta": 500000.0, "use_scaled_rope": True, "ffn_dim_multiplier": 1.3},
    {**TINY, "n_kv_heads": None},
], ids=["gqa", "llama31-rope-mqa", "mha"])
def test_logits_match_hf(params, spm_path):
    vocab = 320
    weights = random_weights(params, vocab, seed=1)
    ours = build_local(params, weights, vocab)
    hf = to_hf(params, weights, vocab)
    tokens = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    got = ours(tokens)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < REL_TOL


def test_greedy_generation_matches_hf(tiny_ckpt, spm_path):
    folder, weights = tiny_ckpt
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=128, max_batch_size=4)
    # where our CPU kernels build (CI's machine), the decode steps run one native call a layer (cpu_step.py);
    # elsewhere the eager layers, which test_engine.py checks against recomputing
    assert (llama.engine.native is not None) == native.available()
    vocab = llama.tokenizer.n_words
    hf = to_hf(TINY, weights, vocab)
    prompts = ["Hello world", "The cat sleeps under the tree because", "42"]
    prompt_tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    gen, _ = llama.generate(prompt_tokens, max_gen_len=40, temperature=0)
    assert any(len(g) >= 20 for g in gen)
    for p, g in zip(prompt_tokens, gen):
        with torch.no_grad():
            logits = hf(torch.tensor([p + g])).logits[0]
        assert_greedy_matches(g, logits, start=len(p))
        # HF's own greedy loop, independent of ours, agrees up to the first near-tie.
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=len(g), do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        first_diff = next((i for i, (a, b) in enumerate(zip(out, g)) if a != b), None)
        if first_diff is not None:
            assert_greedy_matches(g[:first_diff + 1], logits, start=len(p))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_width_checkpoint_runs_in_fp32_on_the_cpu_and_matches_hf(tmp_path, spm_path, stored):
    """Meta's checkpoints store bf16 (older ones fp16). On the CPU the linear weights stay so where our kernels
    run, widened to fp32 as they are read (exact): greedy tokens match HF transformers in fp32 on the stored
    values, and the logits an explicit --dtype fp32 (widened at load) gives."""
    from helpers import make_model_folder

    folder, weights = make_model_folder(tmp_path / "m", spm_path, TINY, seed=2, dtype=stored)
    tok = str(folder / "tokenizer.model")
    llama = Llama.build(str(folder), tok, max_seq_len=128, max_batch_size=2)
    m = llama.model
    assert m.tok_embeddings.weight.dtype == m.norm.weight.dtype == torch.float32  # activations fp32
    if native.available():
        assert {x.weight.dtype for x in (m.output, m.layers[0].attention.wq, m.layers[1].feed_forward.w2)} == {stored}
        assert llama.engine.native is not None
    else:  # PyTorch's products need one dtype: widened at load
        assert m.layers[0].attention.wq.weight.dtype == torch.float32
    hf = to_hf(TINY, {k: v.float() for k, v in weights.items()}, llama.tokenizer.n_words)
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ["Hello world", "The cat sleeps because"]]
    gen, _ = llama.generate(prompts, max_gen_len=30, temperature=0)
    for p, g in zip(prompts, gen):
        with torch.no_grad():
            logits = hf(torch.tensor([p + g])).logits[0]
        assert_greedy_matches(g, logits, start=len(p))
    wide = Llama.build(str(folder), tok, max_seq_len=128, max_batch_size=2, dtype="fp32")
    assert wide.model.layers[0].attention.wq.weight.dtype == torch.float32
    ids = prompts[1]
    a = [llama.engine.prefill([0], [ids])]
    b = [wide.engine.prefill([0], [ids])]
    for k in range(4):
        token = a[-1].argmax(-1)
        a.append(llama.engine.decode(token, [len(ids) + k]))
        b.append(wide.engine.decode(token, [len(ids) + k]))
    assert rel_err(torch.cat(a), torch.cat(b)) < 1e-5


def test_wrong_token_is_detected():
    """The tie check above must fail on a token that is merely plausible."""
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    with pytest.raises(AssertionError, match="wrong token"):
        assert_greedy_matches([2], logits, start=1)
    assert_greedy_matches([1], logits, start=1)


def test_meta_hidden_dim_rule():
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B


def test_model_builds_without_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    model = Transformer(model_args(TINY, 320))
    assert model.layers[0].attention.n_local_heads == 4


def test_bf16_greedy_close_to_fp32(tiny_ckpt):
    folder, _ = tiny_ckpt
    tok = str(folder / "tokenizer.model")
    a = Llama.build(str(folder), tok, 64, 1, dtype="fp32")
    b = Llama.build(str(folder), tok, 64, 1, dtype="bf16")
    assert b.model.tok_embeddings.weight.dtype == torch.bfloat16
    ids = [a.tokenizer.encode("Hello world", bos=True, eos=False)]
    ga, _ = a.generate(ids, 4, temperature=0)
    gb, _ = b.generate(ids, 4, temperature=0)
    assert ga[0][:2] == gb[0][:2]


def test_fused_weights_give_the_same_logits():
    """fuse() (used on GPUs) stacks wq/wk/wv and w1/w3 without changing the result."""
    vocab = 320
    weights = random_weights(TINY, vocab, seed=4)
    plain, fused = build_local(TINY, weights, vocab), build_local(TINY, weights, vocab)
    fused.fuse()
    assert fused.layers[0].attention.wqkv is not None and fused.layers[0].feed_forward.w13 is not None
    assert fused.layers[0].attention.wk.weight.data_ptr() != weights["layers.0.attention.wk.weight"].data_ptr()
    seq = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
    assert rel_err(fused(seq), plain(seq)) < 1e-6
    # decode steps too (q and k rotated together when stacked)
    from llama_cli.engine import Engine

    steps = []
    for m in (plain, fused):
        eng = Engine(m, 2, 32)
        eng.prefill([0, 1], [s[:5].tolist() for s in seq])
        steps.append(torch.stack([eng.decode(seq[:, p], [p, p]) for p in range(5, 12)]))
    assert rel_err(steps[1], steps[0]) < 1e-6



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_rounds_as_meta_does(dtype):
    """Meta's RMSNorm: normalise in fp32, round to the activations' dtype, then scale; ours calls
    F.rms_norm on the 16-bit input directly (it computes in fp32), with the same result."""
    from llama_cli.model import rms_norm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 512, generator=g) * 3).to(dtype)
    w = (torch.rand(512, generator=g) + 0.5).to(dtype)
    xf = x.float()
    meta = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
    got = rms_norm(x, w, 1e-5)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 0.0
    assert (got.float() - meta.float()).abs().max().item() <= tol * meta.abs().max().item()
