"""The thread governor (llama_cli/cpu_share.py): fewer threads while other work keeps the CPUs busy, more again
when it stops; driven here by made-up clocks, then in the engine, where the outputs must not change with it."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from llama_cli import cpu_share
from llama_cli.cpu_share import HOLD_S, LOW, MAX_HOLD_S, WINDOW_S, ThreadGovernor


class Machine:
    """Made-up clocks: each step takes `wall` seconds, of which the calling thread has a CPU for share * wall."""

    def __init__(self, most: int, seed: int = 0, others=lambda: 0):
        self.wall = self.cpu = 0.0
        self.sets: list[tuple[float, int]] = []  # (when, threads) for each change
        self.gov = ThreadGovernor(most, set_threads=lambda n: self.sets.append((self.wall, n)),
                                  clock=lambda: self.wall, cpu_clock=lambda: self.cpu, seed=seed, others=others)

    def steps(self, n: int, share, wall: float = 0.01) -> None:
        for _ in range(n):
            started = self.gov.start()
            self.wall += wall
            self.cpu += wall * (share(self.gov.now) if callable(share) else share)
            self.gov.stop(started)


def test_an_idle_machine_keeps_every_thread():
    m = Machine(4)
    m.steps(5000, 1.0)
    m.steps(500, 0.9)  # a share near 1 (short stalls: page faults, other programs' moments) changes nothing
    assert m.sets == [] and m.gov.now == 4


def test_busy_cpus_lower_the_threads_to_what_is_left(caplog):
    """A share below LOW over a window: the threads the other work leaves (each of ours getting about
    most / (ours + theirs) of a CPU), at least one fewer, at least one; said once in a log line."""
    for most, share, want in ((2, 0.5, 1), (2, 2 / 3, 1), (8, 8 / 9, 8), (8, 8 / 10, 6), (8, 0.5, 1), (4, 0.8, 3)):
        if share >= LOW:  # (8 threads and one busy CPU of eight: too small a loss to be told from noise)
            want = most
        m = Machine(most)
        with caplog.at_level("INFO", logger="llama_cli"):
            caplog.clear()
            m.steps(int(WINDOW_S / 0.01) + 1, share)
        assert m.gov.now == want, (most, share)
        assert m.sets == ([] if want == most else [(m.sets[0][0], want)])
        told = [r.getMessage() for r in caplog.records]
        assert told == ([] if want == most else [f"other work is keeping this machine's CPUs busy: decoding on "
                                                 f"{want} of {most} threads while it does (--threads N fixes the "
                                                 f"count)"])


def test_tries_one_thread_more_and_backs_off_while_the_cpus_stay_busy(caplog):
    """With the other work still there, each try of one thread more ends on its first step (its share falls)
    and the next waits twice as long (jittered by a quarter, at most MAX_HOLD_S); the log line is said once."""
    m = Machine(2)
    # on two threads the other work halves our share; on one the thread has a CPU of its own
    with caplog.at_level("INFO", logger="llama_cli"):
        m.steps(20000, lambda now: 0.5 if now == 2 else 1.0)  # 200 s of steps
    assert [n for _, n in m.sets][:7] == [1, 2, 1, 2, 1, 2, 1]
    tries = [t for t, n in m.sets if n == 2]
    ends = [t for t, n in m.sets if n == 1]
    assert all(0 < end - t <= 0.0101 for t, end in zip(tries, ends[1:]))  # one step each
    gaps = [t - end for end, t in zip(ends, tries)]
    hold = HOLD_S
    for gap in gaps:
        assert 0.75 * hold - 0.02 <= gap <= 1.25 * hold + WINDOW_S + 0.02, (gaps, hold)
        hold = min(2 * hold, MAX_HOLD_S)
    assert len(gaps) >= 12 and len(caplog.records) == 1


def test_programs_already_running_take_their_cpus_before_the_first_step(caplog):
    """Before its first step the governor looks at the threads of other programs that are running: the first
    step runs on the CPUs they leave (at least one); looked at once only; none, or not known: all. Nothing is
    said until a try of more threads fails (the look may have met a moment's blip)."""
    for most, others, want in ((2, 1, 1), (2, 5, 1), (8, 3, 5), (4, 0, 4), (4, None, 4), (1, 2, 1)):
        looks = []
        m = Machine(most, others=lambda: looks.append(1) or others)
        with caplog.at_level("INFO", logger="llama_cli"):
            caplog.clear()
            m.steps(1, 1.0)
            assert m.gov.now == want and m.sets == ([] if want == most else [(0.0, want)])
            m.steps(10, 1.0)
            assert not caplog.records
        assert looks == [1] and m.gov.now == want  # (a try comes only after HOLD_S)
    m = Machine(2, others=lambda: 1)
    with caplog.at_level("INFO", logger="llama_cli"):
        caplog.clear()
        m.steps(1000, 1.0)  # the other program had ended: back to two threads at the first try, nothing said
    assert [n for _, n in m.sets] == [1, 2] and 0.75 * HOLD_S <= m.sets[1][0] <= 1.25 * HOLD_S + WINDOW_S
    assert not caplog.records
    m = Machine(2, others=lambda: 1)
    with caplog.at_level("INFO", logger="llama_cli"):
        caplog.clear()
        m.steps(1000, lambda now: 0.5 if now == 2 else 1.0)  # it is still there: the try fails, said then
    assert [n for _, n in m.sets][:3] == [1, 2, 1] and len(caplog.records) == 1
    assert "decoding on 1 of 2 threads" in caplog.records[0].getMessage()


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="Linux's /proc/loadavg is not here")
def test_others_running_counts_another_programs_busy_threads():
    """The real look: two busy loops in two other processes (no GIL between them) are running, or waiting for a
    CPU, all along once each has said it started, so at least one is seen in each look, whatever else the machine
    does; this process's own running thread is not counted. (Its first form started one process of two threads
    and looked 0.5 s later: on a loaded machine the process had not yet started, or its threads took turns at the
    GIL, and the look saw 0.)"""
    assert cpu_share.others_running() >= 0
    loop = "print('started', flush=True)\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for hog in hogs:
            assert hog.stdout.readline() == "started\n"
        assert cpu_share.others_running() >= 1
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_threads_come_back_when_the_other_work_ends():
    """A try whose steps keep their share for a whole window is kept, and the next one comes HOLD_S later."""
    m = Machine(4)
    busy = {"on": True}
    m.steps(30, lambda now: 0.5 if busy["on"] else 1.0)  # four of ours and four of theirs on four CPUs
    assert m.gov.now == 1
    busy["on"] = False
    m.steps(2000, 1.0)  # 20 s
    assert m.gov.now == 4 and [n for _, n in m.sets] == [1, 2, 3, 4]
    times = [t for t, _ in m.sets]
    # kept at the end of its window, the next try after HOLD_S (jittered), at the end of a window
    assert all(WINDOW_S + 0.75 * HOLD_S <= b - a <= 1.25 * HOLD_S + 2 * WINDOW_S + 0.02
               for a, b in zip(times[1:], times[2:]))


def test_no_tries_while_one_thread_is_short_of_a_cpu():
    m = Machine(2)
    m.steps(3000, 0.4)
    assert [n for _, n in m.sets] == [1]


def test_threads_stay_within_one_and_the_most_whatever_the_shares():
    rng = random.Random(0)
    for most in (1, 2, 3, 8):
        m = Machine(most, seed=most)
        for _ in range(300):
            share = rng.choice([0.0, 0.3, 0.6, 0.84, 0.86, 1.0])
            m.steps(rng.randint(1, 60), share, wall=rng.choice([0.001, 0.02, 0.3]))
            assert 1 <= m.gov.now <= most
        assert all(1 <= n <= most for _, n in m.sets)
        assert all(a != b for (_, a), (_, b) in zip(m.sets, m.sets[1:]))  # only changes are made


class Toggle:
    """A governor that changes the thread count before every step (1, 2, 1, ...)."""

    def __init__(self):
        self.calls = 0

    def start(self):
        self.calls += 1
        torch.set_num_threads(1 + self.calls % 2)
        return None

    def stop(self, started):
        pass


def test_outputs_do_not_depend_on_thread_changes(tiny_ckpt, keep_threads):
    """Greedy and sampled generations, a batch of prompts of different lengths (the continuous schedule's
    prefills and many-row steps), with the thread count changed before every step: the same tokens and
    log-probabilities as on a fixed count."""
    from llama_cli import Llama

    folder, _ = tiny_ckpt
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 4, 4]]
    got = {}
    for toggled in (False, True):
        torch.set_num_threads(2)
        llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 4, threads=2, seed=3)
        if toggled:
            llama.engine.governor = Toggle()
        for temperature in (0.0, 0.8):
            tokens, logprobs = llama.generate(prompts, max_gen_len=24, temperature=temperature, logprobs=True)
            got[toggled, temperature] = json.dumps([tokens, logprobs])
        if toggled:
            assert llama.engine.governor.calls > 40
    assert got[True, 0.0] == got[False, 0.0] and got[True, 0.8] == got[False, 0.8]


def test_the_governor_runs_where_the_thread_count_is_ours(tiny_ckpt, monkeypatch, keep_threads):
    """Llama.build: a governor on the CPU with PyTorch's default count of 2+ threads; none where --threads or
    OMP_NUM_THREADS chose the count, where one thread is all there is, or where the step is compiled (its
    thread count is in its code). A later model starts again from PyTorch's count, not what a governor left."""
    from llama_cli import Llama, devices

    folder, _ = tiny_ckpt
    tok = str(folder / "tokenizer.model")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "cpu_quota", lambda: None)
    monkeypatch.setattr(devices, "_DEFAULT_THREADS", {})
    torch.set_num_threads(2)
    llama = Llama.build(str(folder), tok, 32, 1)
    assert isinstance(llama.engine.governor, ThreadGovernor) and llama.engine.governor.most == 2
    torch.set_num_threads(1)  # as a governor would leave it
    again = Llama.build(str(folder), tok, 32, 1)
    assert torch.get_num_threads() == 2 and again.engine.governor.most == 2
    assert Llama.build(str(folder), tok, 32, 1, threads=2).engine.governor is None
    assert Llama.build(str(folder), tok, 32, 1, compile="on").engine.governor is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert Llama.build(str(folder), tok, 32, 1).engine.governor is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(devices, "_DEFAULT_THREADS", {"n": 1})
    assert Llama.build(str(folder), tok, 32, 1).engine.governor is None


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_the_engine_tells_the_governor_of_each_step(tiny_ckpt, monkeypatch, keep_threads, share):
    """Every prefill and decode step goes through the governor: made to see a low share, it lowers the
    threads of the run it governs; a full share leaves them."""
    from llama_cli import Llama

    folder, _ = tiny_ckpt
    torch.set_num_threads(2)
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 2, threads=2)
    clock = {"wall": 0.0, "cpu": 0.0}

    def tick():  # each reading of the wall clock moves it on by one made-up step
        clock["wall"] += 0.05
        clock["cpu"] += 0.05 * share
        return clock["wall"]

    gov = ThreadGovernor(2, clock=tick, cpu_clock=lambda: clock["cpu"], others=lambda: 0)
    told = []
    gov.start = lambda: told.append(1) or ThreadGovernor.start(gov)
    llama.engine.governor = gov
    steps, prefills = llama.engine.steps, llama.engine.prefills
    llama.generate([[1, 5, 9], [1, 7]], max_gen_len=12, temperature=0.0)
    assert llama.engine.steps - steps >= 11 and llama.engine.prefills - prefills >= 1
    assert len(told) == llama.engine.steps - steps + llama.engine.prefills - prefills
    assert torch.get_num_threads() == gov.now == (1 if share < LOW else 2)
    assert cpu_share.log.name == "llama_cli"


needs_run_delays = pytest.mark.skipif(not cpu_share.RunClock.available() or not hasattr(os, "sched_setaffinity"),
                                      reason="Linux's per-thread run delays (/proc schedstat) are not kept here")


def _busy_share(clock, seconds: float) -> float:
    """The clock's advance over `seconds` of this thread's busy loop, as a share of the wall time."""
    wall, busy = time.perf_counter(), clock()
    while time.perf_counter() - wall < seconds:
        pass
    return (clock() - busy) / (time.perf_counter() - wall)


@needs_run_delays
def test_the_run_clock_falls_behind_only_while_another_program_holds_the_cpu():
    """RunClock, the governor's default on Linux: with a busy loop of another process on this thread's one
    CPU, it advances about half as fast as the wall clock; alone, or sleeping (as a read from a cold disk
    waits), as fast (where the thread's CPU time would stand still). "Alone" is not in our hands: the suite's other
    worker, or anything else on the machine, may be scheduled on that CPU for a while (on CI one such look read
    0.845), and that only ever slows this clock. So it looks up to five times and keeps the best look."""
    clock = cpu_share.RunClock()
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})  # this thread only
    try:
        alone = slept = 0.0
        for _ in range(5):
            alone = max(alone, _busy_share(clock, 0.3))
            wall, run, cpu_time = time.perf_counter(), clock(), time.thread_time()
            time.sleep(0.2)
            slept = max(slept, (clock() - run) / (time.perf_counter() - wall))
            assert time.thread_time() - cpu_time < 0.05
            if alone > 0.85 and slept > 0.9:
                break
        loop = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
        hog = subprocess.Popen([sys.executable, "-c", loop])
        try:
            time.sleep(0.3)  # (its start)
            shared = _busy_share(clock, 0.6)
        finally:
            hog.kill()
            hog.wait()
    finally:
        os.sched_setaffinity(0, saved)
    assert alone > 0.85 and slept > 0.9, (alone, slept)
    assert shared < 0.75, shared


@needs_run_delays
def test_the_run_clock_reads_each_threads_own_file_and_opens_it_again_where_it_fails():
    import threading

    clock = cpu_share.RunClock()
    clock()
    tid = threading.get_native_id()
    others = []
    t = threading.Thread(target=lambda: others.append(threading.get_native_id()) or clock())
    t.start()
    t.join()
    assert set(clock._files) == {tid, others[0]}
    null = os.open(os.devnull, os.O_RDONLY)  # (a file that no longer reads as one: an ended thread's)
    clock._files[tid] = null
    got = clock()
    with open("/proc/thread-self/schedstat") as f:
        want = time.perf_counter() - int(f.read().split()[1]) / 1e9
    assert os.path.realpath(f"/proc/self/fd/{clock._files[tid]}").endswith(f"/task/{tid}/schedstat")
    assert abs(got - want) < 0.1
