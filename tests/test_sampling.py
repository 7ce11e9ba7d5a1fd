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


def test_inverse_cdf_draws_each_token_with_its_probability():
    from llama_cli.sampling import inverse_cdf

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0]])
    n = 10_000
    u = (torch.arange(n) + 0.5) / n  # evenly over [0, 1): each token's share of them is its probability
    got = inverse_cdf(probs.expand(n, -1), u)[:, 0]
    counts = torch.bincount(got, minlength=6).tolist()
    assert counts == [5000, 3000, 1500, 500, 0, 0]
    edge = inverse_cdf(probs.expand(3, -1), torch.tensor([0.0, 1 - 2**-24, 1.0]))[:, 0].tolist()
    assert edge == [0, 3, 3]  # u rounded up to the total still takes the last token that may be drawn
    holes = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])  # tokens left out anywhere (token order)
    got = inverse_cdf(holes.expand(n, -1), u)[:, 0]
    assert torch.bincount(got, minlength=6).tolist() == [0, 5000, 0, 2500, 2500, 0]
    assert inverse_cdf(holes, torch.tensor([1.0]))[0, 0].item() == 4


def test_a_draw_does_not_hang_on_how_near_equal_probabilities_sort():
    """Found by scripts/fuzz_batching.py (seed 15, trial 3195): the inverse ran over the probabilities sorted, so two
    tokens about as likely, whose places in the sort a batch's rounding can swap, gave the same draw number to
    different tokens: a prompt batched and alone parted at its second token. The inverse runs in token order."""
    from llama_cli.sampling import sample_top_p

    probs = torch.tensor([[0.1, 0.3 + 1e-7, 0.3, 0.3 - 1e-7]])
    probs = probs / probs.sum()
    swapped = probs.clone()  # tokens 1 and 2 moved by rounding-sized amounts: now 2 sorts before 1
    swapped[0, 1], swapped[0, 2] = probs[0, 2], probs[0, 1]
    u = torch.linspace(0, 1 - 2**-24, 2001)
    a = sample_top_p(probs.expand(2001, -1), 1.0, u=u)
    b = sample_top_p(swapped.expand(2001, -1), 1.0, u=u)
    assert (a != b).float().mean() < 0.002  # parted only where u lies within rounding of a boundary


def test_a_rows_stream_is_its_own():
    from llama_cli.sampling import stream_key, uniforms

    keys = [stream_key(5, i) for i in range(1000)]
    assert len(set(keys)) == 1000 and stream_key(5, 3) != stream_key(6, 3)
    assert stream_key(5, 3, seed=9) == stream_key(6, 800, seed=9) != stream_key(5, 3, seed=10)
    u = torch.tensor(uniforms([keys[0]] * 100_000, range(100_000)))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert uniforms(keys[:3], [4, 4, 4]) == [uniforms([k], [4])[0] for k in keys[:3]]  # nothing else moves it

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    settings = Settings(temperature=1.0, top_p=0.95)
    alone = []
    for i in range(6):  # each row alone, at draw 2
        s = Sampler(1, 50, torch.device("cpu"))
        s.set_row(0, settings, [], keys[i])
        alone.append(s.sample(logits[i:i + 1], draws=[2]).item())
    s = Sampler(6, 50, torch.device("cpu"))
    for i in reversed(range(6)):  # together, set in another order, one row moved
        s.set_row(i, settings, [], keys[i])
    s.move_row(5, 0)
    s.set_row(5, settings, [], keys[0])
    assert s.sample(logits[[5, 1, 2, 3, 4, 0]], draws=[2] * 6).tolist() == [alone[i] for i in (5, 1, 2, 3, 4, 0)]
    assert len(set(alone)) > 1


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


# --- the samplers against independent implementations ------------------------------------------------

def _history():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 40, generator=g) * 3
    prompts = [[1, 5, 5, 9], [2], [7, 8]]
    generated = [[5, 12, 12, 12], [3, 3], []]
    return logits, prompts, generated


def _sampler_with(settings, prompts, generated, vocab=40):
    s = Sampler(len(prompts), vocab, torch.device("cpu"), torch.Generator().manual_seed(0))
    for i, (p, gen) in enumerate(zip(prompts, generated)):
        s.set_row(i, settings, p)
        for t in gen:  # tokens generated one step at a time, in row i only
            s.seen[i, t] = True
            s.counts[i, t] += 1
    return s


def test_repetition_penalty_is_hf_s():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from llama_cli.sampling import apply_penalties

    logits, prompts, generated = _history()
    s = _sampler_with(Settings(repetition_penalty=1.3), prompts, generated)
    ours = apply_penalties(logits, s.seen, s.counts, s.repetition, s.presence, s.frequency)
    hf = RepetitionPenaltyLogitsProcessor(1.3)
    for i in range(3):
        ids = torch.tensor([prompts[i] + generated[i]])
        want = hf(ids, logits[i:i + 1].clone())[0]
        assert torch.allclose(ours[i], want, atol=1e-6)


def test_presence_and_frequency_penalties_are_openai_s():
    """OpenAI: mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, c counting the
    tokens generated so far (the prompt's do not count)."""
    from llama_cli.sampling import apply_penalties

    logits, prompts, generated = _history()
    s = _sampler_with(Settings(presence_penalty=0.7, frequency_penalty=0.4), prompts, generated)
    ours = apply_penalties(logits, None, s.counts, s.repetition, s.presence, s.frequency)
    for i in range(3):
        want = logits[i].clone()
        for j in set(generated[i]):
            c = generated[i].count(j)
            want[j] -= c * 0.4 + 0.7
        assert torch.allclose(ours[i], want, atol=1e-6)


def test_min_p_top_k_top_p_keep_what_hf_s_warpers_keep():
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from llama_cli.sampling import filtered_probs

    g = torch.Generator().manual_seed(9)
    for trial in range(20):
        logits = torch.randn(1, 60, generator=g) * 2
        t, k, p, m = 0.8, [0, 5, 20][trial % 3], [1.0, 0.9, 0.6][trial % 3], [0.0, 0.05, 0.2][trial % 3]
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        scores = TopPLogitsWarper(p)(None, scores)
        if m:
            scores = MinPLogitsWarper(m)(None, scores)
        want = set(torch.nonzero(scores[0] > -float("inf")).flatten().tolist())
        probs = torch.softmax(logits / t, -1)
        kept, idx = filtered_probs(probs, p, top_k=k, min_p=m)
        got = set(idx[0][kept[0] > 0].tolist())
        assert got == want, (trial, got ^ want)
        ref = torch.softmax(scores[0], -1)
        assert torch.allclose(torch.zeros(60).scatter(0, idx[0], kept[0]), ref, atol=1e-6)


def test_penalties_end_to_end_against_hf_generate(tiny_ckpt):
    """Greedy with repetition_penalty through both schedules = HF generate with its processor (fp32)."""
    from helpers import TINY, requests, to_hf
    from llama_cli.scheduler import Options, run_continuous, run_static

    folder, weights = tiny_ckpt
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 96, 2)
    hf = to_hf(TINY, weights, llama.tokenizer.n_words)
    prompts = ["Hello world", "The cat sleeps"]
    reqs = requests(prompts, temperature=0, max_gen_len=20, repetition_penalty=1.5)
    for schedule in (run_static, run_continuous):
        got = {}
        schedule(llama, reqs, Options(), lambda r: got.__setitem__(r.request.index, r.tokens))
        for i, p in enumerate(prompts):
            ids = llama.tokenizer.encode(p, bos=True, eos=False)
            with torch.no_grad():
                want = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                                   eos_token_id=llama.tokenizer.eos_id, pad_token_id=0)[0, len(ids):].tolist()
            want = want[:want.index(llama.tokenizer.eos_id)] if llama.tokenizer.eos_id in want else want
            assert got[i] == want, (schedule.__name__, got[i], want)
            assert len(set(got[i])) > len(got[i]) // 2  # the penalty kept it from looping


def test_sampling_with_settings_is_deterministic_under_a_seed(tiny_ckpt):
    from helpers import requests
    from llama_cli.scheduler import Options, run_continuous, run_static

    folder, _ = tiny_ckpt
    reqs = requests(["Hello", "The dog", "a"], temperature=1.0, top_p=0.95, min_p=0.05, frequency_penalty=0.5,
                    max_gen_len=10)
    for schedule in (run_static, run_continuous):
        runs = []
        for seed in (3, 3, 4):
            llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 2, seed=seed)
            out = {}
            schedule(llama, reqs, Options(), lambda r: out.__setitem__(r.request.index, r.tokens))
            runs.append(out)
        assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_text_ends_the_generation_and_is_not_shown(tiny_ckpt):
    from helpers import requests
    from llama_cli.scheduler import Options, run_continuous, run_static

    folder, _ = tiny_ckpt
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 96, 2)
    free = {}
    run_static(llama, requests(["Hello world"], temperature=0, max_gen_len=30), Options(),
               lambda r: free.__setitem__(0, r))
    text = free[0].generation
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3 and stop in text
    for schedule in (run_static, run_continuous):
        got = {}
        schedule(llama, requests(["Hello world"], temperature=0, max_gen_len=30, stop=[[stop]]), Options(),
                 lambda r: got.__setitem__(0, r))
        r = got[0]
        assert r.generation == text[:text.index(stop)], schedule.__name__
        assert r.finish_reason == "stop"
        assert len(r.tokens) < len(free[0].tokens)
        assert stop in llama.tokenizer.decode(r.tokens)  # the tokens go up to the one that completed it


def test_streaming_never_prints_part_of_a_stop_text():
    from llama_cli.stopping import StopText

    class Chars:  # each id is one character
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    w = StopText(Chars(), ["END"])
    shown = []
    for k, ch in enumerate("abcENxENDzz", 1):
        w.update([ord(c) for c in "abcENxENDzz"[:k]])
        shown.append(w.safe_text())
    assert shown[3] == "abc" and shown[4] == "abc"  # "E", "EN" held back
    assert shown[5] == "abcENx"  # released once it cannot be the stop text
    assert shown[-1] == "abcENx" and w.stopped
