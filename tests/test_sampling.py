import pytest
import torch

from llama_cli.generation import Llama
from llama_cli.sampling import Sampler, sample, sample_top_p
from llama_cli.settings import Settings


def probs_row():
    # sorted mass: 0.5, 0.3 | 0.1, 0.06, 0.04  -> nucleus at p=0.75 is {3, 0}
    return torch.tensor([[0.3, 0.06, 0.1, 0.5, 0.04]])


def test_top_p_never_draws_outside_the_nucleus():
    g = torch.Generator().manual_seed(0)
    probs = probs_row().expand(4000, -1)
    drawn = sample_top_p(probs, 0.75, generator=g)
    assert set(drawn.tolist()) == {0, 3}  # every nucleus token appears, nothing else does
    frac = (drawn == 3).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.03  # renormalised within the nucleus


def test_top_p_boundary_includes_the_token_that_crosses_p():
    g = torch.Generator().manual_seed(0)
    drawn = sample_top_p(probs_row().expand(4000, -1), 0.79, generator=g)
    assert set(drawn.tolist()) == {0, 3}  # 0.5 + 0.3 passes 0.79: token 2 stays out
    drawn = sample_top_p(probs_row().expand(4000, -1), 0.81, generator=g)
    assert set(drawn.tolist()) == {0, 2, 3}


def test_top_k_limits_further():
    g = torch.Generator().manual_seed(0)
    drawn = sample_top_p(probs_row().expand(2000, -1), 1.0, top_k=1, generator=g)
    assert set(drawn.tolist()) == {3}


def test_top_p_one_can_draw_everything():
    g = torch.Generator().manual_seed(0)
    drawn = sample_top_p(probs_row().expand(4000, -1), 1.0, generator=g)
    assert set(drawn.tolist()) == {0, 1, 2, 3, 4}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, -1.0, 0.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]


def test_same_seed_same_sample():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    a = sample(logits, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    b = sample(logits, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    c = [sample(logits, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, x) for x in c)


def test_per_row_settings():
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]] * 2000)
    s = Sampler(2000, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    for i in range(2000):
        s.set_row(i, Settings(temperature=0.0) if i % 2 == 0 else Settings(temperature=1.0, top_p=0.5), [])
    out = s.sample(logits)
    assert set(out[0::2].tolist()) == {1}  # greedy rows
    assert set(out[1::2].tolist()) == {1}  # nucleus 0.5 holds only the top token


def test_text_completion_reproducible_for_a_seed(tiny_ckpt):
    folder, _ = tiny_ckpt
    tok = str(folder / "tokenizer.model")
    runs = [Llama.build(str(folder), tok, 64, 2, seed=s).text_completion(["Hello", "The dog"], temperature=1.0,
                                                                        top_p=0.9, max_gen_len=12)
            for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("kw,match", [({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
                                      ({"top_p": 1.5}, "top_p"), ({"max_gen_len": 0}, "max_gen_len")])
def test_bad_sampling_settings(tiny_ckpt, kw, match):
    from llama_cli.errors import UserError

    folder, _ = tiny_ckpt
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 2)
    with pytest.raises(UserError, match=match):
        llama.text_completion(["Hello"], **{"max_gen_len": 4, **kw})
