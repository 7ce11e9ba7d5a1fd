"""Continuous batching: same output as each prompt alone, any finish order, per-prompt settings."""

import json
import random
import re

import pytest
import torch

from helpers import TINY, assert_same_or_near_tie, make_model_folder, requests
from llama_cli import Llama
from llama_cli.cli import cli
from llama_cli.scheduler import Options, run_continuous, run_static


@pytest.fixture(scope="module")
def llama(tmp_path_factory, spm_path):
    folder, _ = make_model_folder(tmp_path_factory.mktemp("sched"), spm_path, {**TINY, "n_layers": 3}, seed=11)
    return Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=224, max_batch_size=4)


def solo(llama, ids, max_gen):
    return llama.generate([ids], max_gen_len=max_gen, temperature=0)[0][0]


def make_requests(n, seed=0):
    rng = random.Random(seed)
    words = "the cat dog sun moon red blue runs jumps under over hello world 42 and".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 5, 9, 14, 20]))) for _ in range(n)]
    return requests(prompts, temperature=0, max_gen_len=[rng.choice([1, 2, 7, 20, 45, 90]) for _ in range(n)])


def test_continuous_equals_one_at_a_time(llama):
    reqs = make_requests(26)  # over six batches of 4, rows ending at very different steps
    results = []
    run_continuous(llama, reqs, Options(), results.append)
    assert sorted(r.request.index for r in results) == list(range(len(reqs)))  # complete, once each
    finish_order = [r.request.index for r in results]
    assert finish_order != sorted(finish_order)  # short jobs overtook long ones: slots were refilled
    for r in results:
        ids = llama.tokenizer.encode(r.request.prompt, bos=True, eos=False)
        want = solo(llama, ids, r.request.settings.max_gen_len)
        assert len(r.tokens) <= r.request.settings.max_gen_len
        assert r.finish_reason == ("length" if len(r.tokens) == r.request.settings.max_gen_len else "stop")
        assert_same_or_near_tie(llama, ids, r.tokens, want)


def test_the_last_prompts_start_longest_first(llama):
    """tail_longest_first: only the last `window` prompts move, ordered by the tokens each may generate (its
    max_gen_len, or the room the cache leaves), ties in input order; and the continuous schedule, which
    uses it, starts the last prompts that way (seen through the order rows are prefilled)."""
    from llama_cli.scheduler import tail_longest_first
    from llama_cli.settings import Settings

    class R:
        def __init__(self, n):
            self.settings = Settings(max_gen_len=n)

    ready = [(R(n), [1] * k) for n, k in [(5, 2), (9, 2), (3, 2), (50, 2), (7, 2), (7, 3), (50, 190)]]
    got = tail_longest_first(ready, 5, 200)
    assert got[:2] == ready[:2]  # before the window: as they came
    # room: 3, 50, 7, 7 (a tie: input order), min(50, 200 - 190) = 10
    assert [ready.index(x) for x in got[2:]] == [3, 6, 4, 5, 2]
    assert tail_longest_first(ready, 100, 200)[0] is ready[3]
    assert tail_longest_first([], 8, 200) == []

    started = []
    engine_prefill = llama.engine.prefill

    def prefill(rows, ids, *a, **k):
        started.extend(len(i) for i in ids)
        return engine_prefill(rows, ids, *a, **k)

    reqs = make_requests(14, seed=5)
    llama.engine.prefill = prefill
    try:
        run_continuous(llama, reqs, Options(), lambda r: None)
    finally:
        llama.engine.prefill = engine_prefill
    ids = [llama.tokenizer.encode(r.prompt, bos=True, eos=False) for r in reqs]
    prepared = [(r, i) for r, i in zip(reqs, ids)]
    assert started == [len(i) for _, i in tail_longest_first(prepared, 8, llama.max_seq_len)]


def test_static_and_continuous_agree(llama):
    reqs = make_requests(10, seed=1)
    a, b = [], []
    run_continuous(llama, reqs, Options(), a.append)
    run_static(llama, reqs, Options(), b.append)
    a = {r.request.index: r for r in a}
    assert sorted(a) == sorted(r.request.index for r in b) == list(range(10))
    for r in b:
        ids = llama.tokenizer.encode(r.request.prompt, bos=True, eos=False)
        assert_same_or_near_tie(llama, ids, a[r.request.index].tokens, r.tokens)
        if a[r.request.index].tokens == r.tokens:
            assert a[r.request.index].finish_reason == r.finish_reason


def test_per_prompt_temperature_inside_one_batch(llama):
    prompts = [r.prompt for r in make_requests(8, seed=2)]
    reqs = requests(prompts, max_gen_len=12, top_p=1.0, temperature=[0.0 if i % 2 == 0 else 1.5 for i in range(8)])
    results = {}
    run_continuous(llama, reqs, Options(), lambda r: results.__setitem__(r.request.index, r))
    for r in reqs[0::2]:  # greedy rows are unaffected by sampled neighbours
        ids = llama.tokenizer.encode(r.prompt, bos=True, eos=False)
        assert_same_or_near_tie(llama, ids, results[r.index].tokens, solo(llama, ids, 12))
    sampled = [results[r.index].tokens for r in reqs[1::2]]
    greedy = [solo(llama, llama.tokenizer.encode(r.prompt, bos=True, eos=False), 12) for r in reqs[1::2]]
    assert sampled != greedy  # temperature 1.5 rows really sampled


def test_logprobs_and_echo_match_static(llama):
    reqs = requests(["the cat runs", "hello"], temperature=0, max_gen_len=[6, 3])
    a, b = [], []
    d = Options(logprobs=True, echo=True)
    run_continuous(llama, reqs, d, a.append)
    run_static(llama, reqs, d, b.append)
    a = sorted(a, key=lambda r: r.request.index)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens
        assert len(x.logprobs) == len(x.tokens)
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


def test_cli_file_gets_finish_order_stdout_gets_input_order(tmp_path, spm_path, capsys):
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=3)
    rows = [{"prompt": "long one", "max_gen_len": 40}] + [{"prompt": f"short {i}", "max_gen_len": 1} for i in range(5)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    code = cli(["--ckpt_dir", str(folder), "--prompts_file", str(f), "--output", "jsonl", "--output_file", str(out),
                "--max_batch_size", "2", "--temperature", "0", "--max_seq_len", "96", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert [json.loads(x)["index"] for x in stdout.splitlines()] == list(range(6))
    file_order = [json.loads(x)["index"] for x in out.read_text().splitlines()]
    assert sorted(file_order) == list(range(6)) and file_order != list(range(6))


def _mixed_requests():
    """Prompts that end every way: max_gen_len, a stop token, a stop text, the cache's end (max_seq_len 224);
    greedy, sampled and penalized rows side by side."""
    base = make_requests(18, seed=3)
    prompts = [r.prompt for r in base] + [" ".join(["the cat runs"] * 16)]  # ~190 tokens: runs into the end
    n = len(prompts)
    gens = [r.settings.max_gen_len for r in base] + [90]
    stops = [[] for _ in range(n)]
    stops[2] = stops[7] = ["e", "a"]
    temps = [0.0] * n
    temps[4] = temps[11] = 0.9
    reps = [1.0] * n
    reps[5] = 1.3
    return requests(prompts, max_gen_len=gens, stop=stops, temperature=temps, repetition_penalty=reps)


def _settled_and_ahead(llama, reqs, opts, monkeypatch) -> list:
    """The continuous schedule run settling every step, then launching ahead (scheduler.AHEAD), the generator
    seeded alike: [(results by index, decode steps run)] for each."""
    import llama_cli.scheduler as scheduler

    got = []
    for ahead in (False, True):
        monkeypatch.setattr(scheduler, "AHEAD", ahead)
        llama.generator.manual_seed(5)
        steps = llama.engine.steps
        out = {}
        run_continuous(llama, reqs, opts, lambda r: out.__setitem__(r.request.index, r))
        got.append((out, llama.engine.steps - steps))
    return got


@pytest.mark.parametrize("opts", [Options(), Options(logprobs=True, echo=True)])
def test_launching_ahead_gives_the_same_results(llama, monkeypatch, opts):
    """scheduler.AHEAD (on by default on CUDA): each step launched before the last one's tokens are read, rows
    that the last token ended dropped from it. For greedy rows (penalized too) the same tokens, finish reasons,
    texts and log-probabilities as settling every step first (this tiny model's rows are computed alike in
    any batch); sampled rows draw differently (the wasted steps draw too). A few more steps (the wasted
    ones): the ahead path did run."""
    reqs = _mixed_requests()
    (a, steps_a), (b, steps_b) = _settled_and_ahead(llama, reqs, opts, monkeypatch)
    assert sorted(a) == sorted(b) == list(range(len(reqs)))
    reasons = {r.finish_reason for r in a.values()}
    assert reasons == {"length", "stop", "max_seq_len"}
    cut = [a[i] for i in (2, 7) if a[i].finish_reason == "stop" and a[i].generation != llama.tokenizer.decode(
        a[i].tokens)]
    assert cut and all("e" not in r.generation[-8:] for r in cut)  # a stop text ended a row
    for i in a:
        if reqs[i].settings.temperature > 0:  # drawn from the seeded generator, which wasted steps draw from too
            assert b[i].finish_reason in ("length", "stop") and len(b[i].tokens) >= (len(a[i].tokens) if
                                                                                   opts.echo else 1)
            continue
        assert (a[i].tokens, a[i].finish_reason, a[i].generation) == (b[i].tokens, b[i].finish_reason,
                                                                      b[i].generation), i
        if opts.logprobs:
            assert torch.allclose(torch.tensor(a[i].logprobs), torch.tensor(b[i].logprobs), atol=1e-5)
    assert steps_b > steps_a


def test_time_to_first_token_without_per_step_callbacks(llama):
    """Both schedules report the time to the first token; the static one without asking for every step's
    tokens on the host (generate_settings' on_first: once a batch, after its first tokens)."""
    import time

    reqs = make_requests(6, seed=4)
    for schedule in (run_static, run_continuous):
        start = time.perf_counter()
        stats = schedule(llama, reqs, Options(), lambda r: None)
        assert 0 < stats.first_token_s < time.perf_counter() - start
    calls = []
    ids = [llama.tokenizer.encode(r.prompt, bos=True, eos=False) for r in reqs]
    llama.generate_settings(ids, [r.settings for r in reqs], on_first=lambda: calls.append(1))
    assert len(calls) == 2  # two batches of at most 4


@pytest.mark.parametrize("batch", [1, 3])
def test_launching_ahead_at_other_batch_sizes(tmp_path, spm_path, monkeypatch, batch):
    """Ahead against settled on random request sets at batch 1 (a one-prompt run on a GPU) and 3: prompts
    ending by length, stop text and the cache's end (max_seq_len 96), log-probabilities on: identical."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, {**TINY, "n_layers": 2}, seed=3)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=96, max_batch_size=batch)
    words = "the cat dog sun moon red blue runs jumps under over hello world 42 and".split()
    reasons = set()
    for seed in range(3):
        rng = random.Random(seed)
        n = rng.randint(2, 9)
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]
        stops = [[rng.choice("eao")] if rng.random() < 0.3 else [] for _ in range(n)]
        reqs = requests(prompts, temperature=0, max_gen_len=[rng.choice([1, 2, 10, 40, 90]) for _ in range(n)],
                        stop=stops)
        (a, _), (b, _) = _settled_and_ahead(llama, reqs, Options(logprobs=True), monkeypatch)
        assert a.keys() == b.keys() == set(range(n))
        reasons.update(r.finish_reason for r in a.values())
        for i in range(n):
            assert (a[i].tokens, a[i].finish_reason, a[i].generation) == (b[i].tokens, b[i].finish_reason,
                                                                          b[i].generation), (seed, i)
            assert torch.allclose(torch.tensor(a[i].logprobs), torch.tensor(b[i].logprobs), atol=1e-5)
    assert reasons == {"length", "stop", "max_seq_len"}


def test_random_configurations_batch_as_they_run_alone(monkeypatch, spm_path):
    """scripts/fuzz_batching.py, a fixed set of its trials: random models (layers, KV heads, fp32/bf16, int8/int4),
    cache sizes, row counts, greedy and sampled settings, log-probabilities and echo, batched by either schedule,
    each prompt the same as alone."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.delitem(sys.modules, "fuzz_batching", raising=False)
    from fuzz_batching import fuzz

    n, stats, found = fuzz(trials=150, seed=1, spm=spm_path)  # ~8 s (a packed prefill not causal for prompts
    # of 3-6 tokens: 3 differences in these trials)
    assert n == 150 and not found, "\n".join(found)
    assert stats["tokens"] > 2000 and {"length", "max_seq_len", "stop", "error"} <= set(stats)


def test_fuzz_batching_penalizes_as_the_sampler_does(monkeypatch):
    """fuzz_batching.py judges a sampled or greedy parting of a penalized prompt on the logits as its penalties
    leave them (found at seed 24, trial 2293: a draw 6e-8 from a boundary of the penalized distribution was
    reported as a difference). Its one-row replay must give what a row of a batch had: the prompt's tokens seen,
    the draws seen and counted (one drawn twice)."""
    import sys
    from pathlib import Path

    from llama_cli.sampling import Sampler, apply_penalties
    from llama_cli.settings import Settings

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.delitem(sys.modules, "fuzz_batching", raising=False)
    from fuzz_batching import penalized

    vocab, prompt, generated = 50, [1, 7, 7, 30], [4, 30, 4, 12]
    s = Settings(temperature=0.7, repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=0.7)
    sampler = Sampler(3, vocab, torch.device("cpu"))
    sampler.set_row(1, s, prompt)
    for t in generated:
        sampler.accept(torch.tensor([0, t, 0]))
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 4
    want = apply_penalties(logits[None], sampler.seen[1:2], sampler.counts[1:2], sampler.repetition[1:2],
                           sampler.presence[1:2], sampler.frequency[1:2])[0]
    got = penalized(logits, s, prompt, generated)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)  # the penalties did something


def test_fuzz_batching_counts_a_tie_at_a_filters_edge_as_a_near_tie(monkeypatch):
    """fuzz_batching.py's filter_margin: where two tokens tie at the edge of what top_k, top_p or min_p keep, a
    nudge of 1e-5 decides which one the sampler keeps (so a batch's rounding may draw another token, found at
    seed 27, trial 1718); the margin is then below the 1e-3 rule, and well above it where nothing ties."""
    import sys
    from pathlib import Path

    from llama_cli.sampling import filtered_probs
    from llama_cli.settings import Settings

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.delitem(sys.modules, "fuzz_batching", raising=False)
    from fuzz_batching import filter_margin

    def kept(logits, s):
        probs, order = filtered_probs(torch.softmax(logits / s.temperature, -1)[None], s.top_p, top_k=s.top_k,
                                      min_p=s.min_p)
        return set(order[0][probs[0] > 0].tolist())

    def sampled(**kw):  # no filter but those given
        return Settings(**{"temperature": 1.0, "top_p": 1.0, **kw})

    base = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    # top_k 3: tokens 2 and 3 tie at the edge
    tie, s = base.clone(), sampled(top_k=3)
    tie[3] = 2.0
    up, down = tie.clone(), tie.clone()
    up[3] += 1e-5
    down[3] -= 1e-5
    assert kept(up, s) != kept(down, s) and filter_margin(tie, s) < 1e-3 < filter_margin(base, s)
    # top_p: the mass before token 2 just at p
    probs = torch.softmax(base, -1)
    s = sampled(top_p=(probs[0] + probs[1]).item())
    assert kept(base, sampled(top_p=s.top_p + 1e-5)) != kept(base, sampled(top_p=s.top_p - 1e-5))
    assert filter_margin(base, s) < 1e-3 < filter_margin(base, sampled(top_p=0.8))
    # min_p: token 1's probability just at min_p times the largest
    ratio = (probs[1] / probs[0]).item()
    assert kept(base, sampled(min_p=ratio + 1e-5)) != kept(base, sampled(min_p=ratio - 1e-5))
    assert filter_margin(base, sampled(min_p=ratio)) < 1e-3 < filter_margin(base, sampled(min_p=0.3))
    assert filter_margin(base, sampled()) == float("inf")  # nothing filtered


def shared_requests(seed=0):
    """Prompts that begin alike: a long shared instruction then their own words, one prompt three times over,
    and some that share nothing."""
    rng = random.Random(seed)
    words = "the cat dog sun moon red blue runs jumps under over hello world 42 and".split()
    head = " ".join(rng.choice(words) for _ in range(30))
    prompts = [head + " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(9)]
    prompts[3:3] = [head] * 3
    prompts[7:7] = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) for _ in range(3)]
    return requests(prompts, temperature=0, max_gen_len=[rng.choice([1, 3, 12, 30]) for _ in prompts])


@pytest.mark.parametrize("share", [True, False])
def test_prompts_that_begin_alike_share_their_beginnings(llama, monkeypatch, share):
    """With --share_prefixes (the default) a prompt that begins as a live one, or as one prefilled afresh in the
    same refill, copies that row's cache for the shared tokens (at least SHARED_MIN, one token of its own left);
    each prompt's tokens are what it gives alone. --noshare_prefixes prefills every prompt whole."""
    from llama_cli import scheduler

    reqs = shared_requests()
    calls = []
    real = llama.engine.prefill_after
    monkeypatch.setattr(llama.engine, "prefill_after", lambda *a: calls.append(a) or real(*a))
    results = []
    run_continuous(llama, reqs, Options(share_prefixes=share), results.append)
    assert sorted(r.request.index for r in results) == list(range(len(reqs)))
    for r in results:
        ids = llama.tokenizer.encode(r.request.prompt, bos=True, eos=False)
        assert_same_or_near_tie(llama, ids, r.tokens, solo(llama, ids, r.request.settings.max_gen_len))
    assert bool(calls) == share
    for rows, starts, rest in calls:
        assert all(n >= scheduler.SHARED_MIN and len(p) >= 1 for (_, n), p in zip(starts, rest))
    if share:  # the first fill: one prompt afresh, the others of the instruction after it in the same refill
        assert len(calls[0][0]) == 3 and {src for src, _ in calls[0][1]} == {0}


def test_prefixes_are_not_shared_where_that_would_change_the_results(tmp_path, spm_path, monkeypatch):
    """A half-width cache holds the shared keys rounded (a prompt alone attends over its own unrounded ones), and
    echo with logprobs needs every prompt position's logits: both prefill every prompt whole."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=3)
    for kv, opts in (("bf16", Options()), (None, Options(logprobs=True, echo=True))):
        llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 224, 4, kv_cache_dtype=kv)
        monkeypatch.setattr(llama.engine, "prefill_after", lambda *a: pytest.fail("shared a prefix"))
        run_continuous(llama, shared_requests(1), opts, lambda r: None)


def test_share_prefixes_flag(tmp_path, spm_path, capsys):
    """--noshare_prefixes on the command line: the same results as sharing, and --help explains the flag."""
    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=4)
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": r.prompt, "max_gen_len": r.settings.max_gen_len}) + "\n"
                         for r in shared_requests(2)))
    outs = []
    for flag in ([], ["--noshare_prefixes"]):
        assert cli(["--ckpt_dir", str(folder), "--prompts_file", str(f), "--max_seq_len", "224", "--temperature",
                    "0", "--output", "jsonl", "--quiet", *flag]) == 0
        outs.append([json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 15
    assert cli(["--ckpt_dir", str(folder), "--prompts_file", str(f), "--max_seq_len", "224", "--temperature", "0",
                "--max_gen_len", "2"]) == 0
    said = re.search(r"(\d+) of 15 prompts began as another in the batch did: (\d+) prompt tokens copied",
                     capsys.readouterr().err)
    assert said and int(said.group(1)) >= 9 and int(said.group(2)) >= 9 * 16
    assert cli(["--help"]) == 0
    assert "share_prefixes" in capsys.readouterr().out


def test_the_gpu_calls_shared_beginnings_check_runs_here(llama, monkeypatch):
    """scripts/gpu_check.py's check of shared beginnings (tiny_agreement, on CUDA graphs there), run on the CPU so
    that the GPU call's copy of the logic cannot rot unseen: it passes, having shared some beginnings."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.delitem(sys.modules, "gpu_check", raising=False)
    import gpu_check

    gpu_check.shared_beginnings(llama, "CPU fp32", 1e-3)
    (result,) = gpu_check.RESULTS["checks"]
    assert result["ok"] and not result["detail"].startswith("0 prompts"), result
