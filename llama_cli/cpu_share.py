"""Fewer CPU threads while other work keeps the CPUs busy, and back again when it stops.

Each product and attention call of a CPU decode step splits its work among the threads and waits for the last
of them (OpenMP). Where other programs keep CPUs busy (several llama-cli runs started at once from a script, a
build, a video call), the kernel takes turns between their threads and ours, and a thread of ours that waits
for its turn holds up every call until it gets one. Measured on the 2-core VM (docs/benchmarks.md, "Other work
on the CPUs", medians of three rounds): beside a process that keeps one core busy, SmolLM2 (the quickstart's)
decoded 35.9 tokens/s on 2 threads, 90.2 on one; two runs started at once, 11.2 each on 2 threads apiece, 84.8
on one. With the governor: 86.2, and 80.9 each.

Before the first step the governor counts the threads of other programs that are running (others_running:
Linux's run queue) and starts on the CPUs they leave: runs a script starts together then never all compute on
every thread at once (their first prefill and step took ~2 s for a few tokens). Then it watches, over windows
of WINDOW_S of decode steps and prefills, the share of their time in which the calling thread was not kept
waiting for a CPU (RunClock: the wall time less the thread's run-queue delay, which Linux keeps; elsewhere its
CPU time). With nothing competing that share is ~1: the thread computes, or waits at the calls' ends, all
along. Where it falls below LOW, the next steps run on as many threads as the competing work leaves CPUs (at
least one fewer than now). Now and then (after HOLD_S, doubling after each try that fails, jittered) it tries
one thread more: a step of the try whose share falls below LOW ends it at once, a window without one keeps it,
so a run gets its threads back when the other work ends. Only where the thread count is ours to choose: no
--threads or OMP_NUM_THREADS given, one process, steps not compiled (a compiled step's thread count is fixed in
its code). Results do not depend on the thread count (each output of our kernels is computed by one thread;
attention's spans are fixed, not per thread; PyTorch's BLAS products gave the same bits on 1 and 2 threads
here; tests/test_cpu_share.py changes the count before every step)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Optional

import torch

WINDOW_S = 0.25  # seconds of steps (decode steps and prefills) per judgement
LOW = 0.85  # a share below this: other work competes for the CPUs
HOLD_S, MAX_HOLD_S = 1.0, 16.0  # seconds between tries of one thread more (doubling while they fail)

log = logging.getLogger("llama_cli")


class RunClock:
    """Seconds the calling thread has not waited for a CPU: the wall clock less the time it spent runnable but
    not running (Linux's /proc schedstat run delay). Unlike CPU time it does not fall while a thread waits on a
    disk (a cold checkpoint's first reads) or sleeps, only when other work holds the CPUs it wants."""

    def __init__(self):
        self._files: dict[int, int] = {}  # thread id -> its open schedstat file

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/thread-self/schedstat") as f:
                return len(f.read().split()) == 3
        except OSError:
            return False

    def __call__(self) -> float:
        tid = threading.get_native_id()
        for _ in range(2):  # a file kept for an ended thread whose id came back is opened again
            fd = self._files.pop(tid, None)
            try:
                if fd is None:
                    fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                delay = int(os.pread(fd, 64, 0).split()[1]) / 1e9
                self._files[tid] = fd
                return time.perf_counter() - delay
            except (OSError, ValueError, IndexError):
                if fd is not None:
                    os.close(fd)
        return time.perf_counter()  # unreadable: no delay seen (the thread count stays as it is)


def others_running() -> Optional[int]:
    """Threads of other programs running or waiting for a CPU right now: Linux's count of runnable threads
    (/proc/loadavg) less this process's own; None where unknown. The least of five looks 2 ms apart, so that a
    moment's blip (a daemon waking) does not count: idle, 3 of 15 runs saw one with three looks 1 ms apart,
    none of 20 with these; two runs started at once saw each other in all of 6. A look that sees none ends it
    (the least is 0 then), so an idle machine pays for one look, not 8 ms of them."""
    seen = []
    for i in range(5):
        if i:
            if seen[-1] == 0:
                break
            time.sleep(0.002)
        try:
            with open("/proc/loadavg") as f:
                total = int(f.read().split()[3].split("/")[0])
            ours = 0
            for tid in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        stat = f.read()
                except OSError:  # (a thread that has just ended)
                    continue
                ours += stat[stat.rindex(")") + 2] == "R"
        except (OSError, ValueError, IndexError):
            return None
        seen.append(max(0, total - ours))
    return min(seen)


def default_clock():
    """RunClock where Linux keeps run delays, else the thread's CPU time (which also falls while it waits on a
    disk: there a cold first read can lower the threads until the next try)."""
    return RunClock() if RunClock.available() else time.thread_time


class ThreadGovernor:
    """Adapts torch's thread count (set_threads), at most `most` (the CPUs this process may use), to the CPU
    share measured over steps: start() before a decode step or prefill, stop(its reading) after it."""

    def __init__(self, most: int, set_threads=torch.set_num_threads, clock=time.perf_counter, cpu_clock=None,
                 seed=None, others=others_running):
        self.most = self.now = most
        self._set, self._clock, self._cpu_clock = set_threads, clock, cpu_clock or default_clock()
        self._others = others  # looked at before the first step (None once looked)
        self._wall = self._cpu = 0.0
        self._hold, self._next_try, self._trying = HOLD_S, 0.0, False
        self._told = False
        # tries at jittered times: runs started together (a script's) do not all try at once
        self._jitter = random.Random(seed)

    def start(self) -> tuple[float, float]:
        if self._others is not None:
            # Before the first step, which no window has measured yet: other programs' threads already running
            # take their CPUs from the start (two runs a script starts at once would otherwise both prefill on
            # every thread, ~2 s for a few tokens on the 2-core VM, before either could tell)
            others, self._others = self._others(), None
            if others:  # (said once a try of more threads has failed: the look alone may have seen a blip)
                self._lower(max(1, self.most - others), self._clock(), tell=False)
        return self._clock(), self._cpu_clock()

    def stop(self, started: tuple[float, float]) -> None:
        """After a step begun at start()'s reading."""
        now = self._clock()
        wall, cpu = now - started[0], self._cpu_clock() - started[1]
        if self._trying and cpu < LOW * wall:  # a try that slows its first steps ends there (one such step of
            self._fail(now)                   # several runs trying at once can take a second)
            return
        self._wall += wall
        self._cpu += cpu
        if self._wall >= WINDOW_S:
            share = self._cpu / self._wall
            self._wall = self._cpu = 0.0
            self._judge(share, now)

    def _judge(self, share: float, now: float) -> None:
        if self._trying:  # one thread more held its share over a whole window: kept
            self._trying, self._hold = False, HOLD_S
            self._next_try = now + self._pause()
        elif share < LOW and self.now > 1:
            # each of our threads gets about most / (ours + theirs) of a CPU: the CPUs their work leaves free
            free = round(self.most + self.now - self.most / max(share, 1e-3))
            self._lower(max(1, min(self.now - 1, free)), now)
        elif share >= LOW and self.now < self.most and now >= self._next_try:
            self._trying = True
            self._use(self.now + 1)

    def _lower(self, n: int, now: float, tell: bool = True) -> None:
        if n >= self.now:
            return
        self._use(n)
        self._next_try = now + self._pause()
        if tell:
            self._tell()

    def _fail(self, now: float) -> None:
        self._trying = False
        self._wall = self._cpu = 0.0
        self._use(self.now - 1)
        self._hold = min(2 * self._hold, MAX_HOLD_S)
        self._next_try = now + self._pause()
        self._tell()

    def _tell(self) -> None:
        if not self._told:
            self._told = True
            log.info("other work is keeping this machine's CPUs busy: decoding on %d of %d threads while it "
                     "does (--threads N fixes the count)", self.now, self.most)

    def _pause(self) -> float:
        return self._hold * self._jitter.uniform(0.75, 1.25)

    def _use(self, n: int) -> None:
        if n != self.now:
            self.now = n
            self._set(n)
            log.debug("decoding on %d thread(s)", n)
