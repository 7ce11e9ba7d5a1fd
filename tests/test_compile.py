"""Compiled decoding gives the same tokens as eager decoding (CPU; the GPU script checks CUDA)."""

from llama_cli import Llama
from test_scheduler import assert_same_or_near_tie


def test_compiled_greedy_equals_eager(tiny_ckpt):
    folder = tiny_ckpt[0]
    tok = str(folder / "tokenizer.model")
    eager = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="off")
    compiled = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="on")
    assert compiled.compiled and not eager.compiled
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello world", "The cat sleeps under")]
    a, _ = eager.generate(prompts, max_gen_len=24, temperature=0)
    b, _ = compiled.generate(prompts, max_gen_len=24, temperature=0)
    for ids, x, y in zip(prompts, b, a):
        assert_same_or_near_tie(eager, ids, x, y)
    # batch of one uses the fused multiply-and-sum matrix-vector path
    c, _ = compiled.generate(prompts[:1], max_gen_len=24, temperature=0)
    assert_same_or_near_tie(eager, prompts[0], c[0], a[0])


def test_compiled_continuous_batching_equals_eager(tiny_ckpt):
    from llama_cli.prompts import PromptRequest
    from llama_cli.scheduler import Defaults, run_continuous

    folder = tiny_ckpt[0]
    tok = str(folder / "tokenizer.model")
    eager = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="off")
    compiled = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="on")
    reqs = [PromptRequest(i, p, max_gen_len=g) for i, (p, g) in enumerate(
        [("Hello", 20), ("The cat", 3), ("42", 9), ("Red green blue", 30), ("a", 1), ("Why", 12)])]
    d = Defaults(max_gen_len=8, temperature=0.0, top_p=1.0)
    a, b = {}, {}
    run_continuous(eager, reqs, d, lambda r: a.__setitem__(r.request.index, r.tokens))
    run_continuous(compiled, reqs, d, lambda r: b.__setitem__(r.request.index, r.tokens))
    for r in reqs:
        ids = eager.tokenizer.encode(r.prompt, bos=True, eos=False)
        assert_same_or_near_tie(eager, ids, b[r.index], a[r.index])


def test_compiled_model_parallel_under_torchrun(tmp_path, tiny_ckpt2, tiny_ckpt):
    from test_checkpoint import greedy, run_torchrun

    # batch 1: on the CPU the compiled step serves 1-2 rows (larger batches stay eager there)
    got = run_torchrun(2, tiny_ckpt2[0], tmp_path / "out", env={"GEN_COMPILE": "on", "GEN_BATCH": "1"})
    assert got["greedy"] == greedy(tiny_ckpt[0])


def test_compile_auto_follows_the_measurements():
    import torch

    from llama_cli.generation import decide_compile

    cpu = torch.device("cpu")
    assert decide_compile("auto", cpu, 1, expected_tokens=10_000) is True
    assert decide_compile("auto", cpu, 1, expected_tokens=100) is False  # compiling would cost more
    assert decide_compile("auto", cpu, 16, expected_tokens=10_000) is False  # eager is faster at batch 16
    assert decide_compile("on", cpu, 16) is True and decide_compile("off", cpu, 1, 10_000) is False
