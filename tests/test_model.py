"""The model against an independent implementation (HF transformers) on the same weights."""

import pytest
import torch

from helpers import TINY, random_weights, to_hf, write_checkpoint
from llama_cli import Llama
from llama_cli.model import ModelArgs, Transformer, ffn_hidden_dim

REL_TOL = 1e-4


def build_local(params, weights, vocab, max_seq_len=256, max_batch_size=4, dtype=torch.float32):
    args, _ = ModelArgs.from_params({**params, "vocab_size": vocab}, max_seq_len=max_seq_len,
                                    max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    model.setup_caches(max_batch_size, max_seq_len)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_greedy_matches(ours: list[int], hf_logits: torch.Tensor, start: int, tol: float = REL_TOL):
    """Each generated token must be HF's argmax at that position, unless HF's top two logits there
    are a near-tie (within tol of the logit scale), where either choice is right."""
    scale = hf_logits.abs().max().item()
    ties = 0
    for i, tok in enumerate(ours):
        row = hf_logits[start + i - 1]
        best = int(row.argmax())
        if tok == best:
            continue
        gap = (row[best] - row[tok]).item()
        assert gap <= tol * scale * 10, (
            f"step {i}: generated token {tok} but HF prefers {best} by {gap:.3g} (logit scale {scale:.3g}): wrong token")
        ties += 1
    assert ties <= len(ours) // 4, f"{ties} near-ties in {len(ours)} steps: the test model is too degenerate"


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
    got = ours(tokens, 0)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < REL_TOL


def test_greedy_generation_matches_hf(tiny_ckpt, spm_path):
    folder, weights = tiny_ckpt
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=128, max_batch_size=4)
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


def test_wrong_token_is_detected():
    """The tie check above must fail on a token that is merely plausible."""
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    with pytest.raises(AssertionError, match="wrong token"):
        assert_greedy_matches([2], logits, start=1)
    assert_greedy_matches([1], logits, start=1)


def test_kv_cache_equals_recompute():
    vocab = 320
    weights = random_weights(TINY, vocab, seed=2)
    model = build_local(TINY, weights, vocab)
    seq = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(1))
    full = model(seq, 0)  # (2, 30, vocab) without reusing any cache
    # prefill 10 tokens, then one at a time, then a chunk of 5
    parts = [model(seq[:, :10], 0)]
    for pos in range(10, 25):
        parts.append(model(seq[:, pos:pos + 1], pos))
    parts.append(model(seq[:, 25:30], 25))
    incremental = torch.cat(parts, dim=1)
    assert rel_err(incremental, full) < 1e-5
    # per-row start positions and cache rows (the continuous-batching path) agree too
    model2 = build_local(TINY, weights, vocab)
    model2(seq[1:, :12], 0, rows=torch.tensor([3]))
    model2(seq[:1, :7], 0, rows=torch.tensor([0]))
    step = model2(torch.stack([seq[0, 7:8], seq[1, 12:13]]), torch.tensor([7, 12]), rows=torch.tensor([0, 3]))
    assert rel_err(step[0, 0], full[0, 7]) < 1e-5
    assert rel_err(step[1, 0], full[1, 12]) < 1e-5


def test_output_index_gives_the_same_logits():
    vocab = 320
    model = build_local(TINY, random_weights(TINY, vocab, seed=3), vocab)
    seq = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    full = model(seq, 0)
    last = model(seq, 0, output_index=torch.tensor([8, 3]))
    assert torch.allclose(last[0, 0], full[0, 8], atol=1e-6) and torch.allclose(last[1, 0], full[1, 3], atol=1e-6)


def test_meta_hidden_dim_rule():
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B


def test_model_builds_without_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    model = Transformer(ModelArgs.from_params({**TINY, "vocab_size": 320})[0])
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
    assert rel_err(fused(seq, 0), plain(seq, 0)) < 1e-6

