"""Which device and precision a process computes on (no process groups here: the offline tools
`convert`, `reshard` and `quantize` use this without touching torch.distributed)."""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch

from .errors import UserError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def pick_device(requested: Union[str, torch.device, None] = None, local_rank: int = 0) -> torch.device:
    """The requested device, else this rank's accelerator (CUDA, MPS, ...) when there is one, else CPU."""
    if requested is None or requested == "auto":
        if not torch.accelerator.is_available():
            return torch.device("cpu")
        kind = torch.accelerator.current_accelerator().type
        count = torch.accelerator.device_count()
        device = torch.device(kind, local_rank % count) if count > 1 else torch.device(kind, 0)
    else:
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError):
            raise UserError(f"unknown device {requested!r}; use cpu, cuda, cuda:N or mps") from None
        if device.type != "cpu":
            acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
            if acc is None or acc.type != device.type:
                raise UserError(f"device {requested!r} is not available on this machine; use --device cpu")
            if device.index is None:
                device = torch.device(device.type, local_rank % torch.accelerator.device_count())
            elif device.index >= torch.accelerator.device_count():
                raise UserError(f"device {requested!r} does not exist; this machine has "
                                f"{torch.accelerator.device_count()} {device.type} device(s)")
    if device.type != "cpu":
        torch.get_device_module(device.type).set_device(device)
    return device


def pick_dtype(device: torch.device, requested: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on other accelerators, fp32 on CPU, unless asked."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None and requested != "auto":
        try:
            return DTYPES[str(requested).lower()]
        except KeyError:
            raise UserError(f"unknown dtype {requested!r}; use one of fp32, bf16, fp16") from None
    if device.type == "cpu":
        return torch.float32
    module = torch.get_device_module(device.type)
    if hasattr(module, "is_bf16_supported") and module.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def keeps_half_weights(device: torch.device) -> bool:
    """Whether linear weights stored in bf16 or fp16 (Meta's checkpoints) can stay so under fp32 activations:
    on the CPU where our kernels are built (native.py), which widen each weight to fp32 as they read it (exact),
    so the results are fp32's, from half the memory and half the bytes read per token. Llama.build keeps them
    so when --dtype is left at its default; an explicit --dtype fp32 widens them at load."""
    from . import native

    return device.type == "cpu" and native.available()


def is_cuda(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU (without spelling the device name out)."""
    return device.type != "cpu" and torch.get_device_module(device.type) is torch.cuda


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one: taskset, a container's
    cpuset, a job scheduler's allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_quota(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The CPUs' worth of time a container may use (`docker --cpus 2`, a Kubernetes CPU limit: its cgroup's
    quota over its period, rounded up), or None where none is set. Such a container sees every CPU of its host
    (its affinity mask too), so PyTorch would start a thread per host core and the quota would stall them all
    in turn. cgroup v2's cpu.max ("200000 100000", or "max 100000"), else v1's cpu.cfs_quota_us (-1: none)."""
    def read(*names):
        for name in names:
            try:
                with open(os.path.join(root, name)) as f:
                    return f.read().split()
            except OSError:
                continue
        return None

    try:
        v2 = read("cpu.max")
        if v2 is not None:
            quota, period = (None, None) if v2[0] == "max" else (int(v2[0]), int(v2[1]))
        else:
            quota = read("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us")
            period = read("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us")
            quota, period = (int(quota[0]), int(period[0])) if quota and period else (None, None)
    except (ValueError, IndexError):
        return None
    if not quota or quota <= 0 or not period or period <= 0:
        return None
    return max(1, -(-quota // period))


def check_threads(threads) -> Optional[int]:
    """--threads: None (PyTorch's default: OMP_NUM_THREADS, else one per core) or 1 to usable_cpus(). More
    threads than CPUs is refused: every product waits for the last of its threads, so threads that share a core
    wait on each other's time slices (one busy core of this VM's two cut SmolLM2's decoding on 2 threads to
    about a third, docs/benchmarks.md)."""
    if threads is None:
        return None
    cpus = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise UserError(f"--threads must be an integer from 1 to {cpus} (the CPUs this process may use), "
                        f"got {threads!r}")
    return threads


_DEFAULT_THREADS: dict = {}  # "n": PyTorch's thread count when use_threads first met it


def use_threads(threads, device: torch.device) -> bool:
    """Run this process's CPU work (PyTorch's and our kernels') on `threads` threads (check_threads' values;
    None leaves PyTorch's default). Warns where the processes that torchrun started on this machine, computing
    on the CPU, ask for more threads together than it has CPUs, and fewer would do (more processes than CPUs at
    one thread each is the launch's choice, which --threads cannot change): said by each machine's first process.
    Returns whether the count is ours to change (neither `threads` nor OMP_NUM_THREADS gave it: cpu_share.py)."""
    threads, quota = check_threads(threads), cpu_quota()
    ours = threads is None and "OMP_NUM_THREADS" not in os.environ
    if ours:  # PyTorch's default (as this process began: an earlier model's governor may have lowered it),
        threads = _DEFAULT_THREADS.setdefault("n", torch.get_num_threads())  # within a container's quota
        if quota is not None and threads > quota:
            threads = quota
            logging.getLogger("llama_cli").info("%d thread(s): this container's CPU quota (--threads overrides)", quota)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    try:
        procs, first = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")) == 0
    except ValueError:
        return ours
    cpus, each = usable_cpus(), torch.get_num_threads()
    cpus = min(cpus, quota) if quota is not None else cpus
    if first and device.type == "cpu" and procs > 1 and each > 1 and procs * each > cpus:
        logging.getLogger("llama_cli").warning(
            "%d processes on this machine x %d threads each is more threads than its %d CPUs, which slows every "
            "step; use --threads %d", procs, each, cpus, max(1, cpus // procs))
    return ours
