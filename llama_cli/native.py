"""Our hand-written CPU kernels (csrc/, one library): the int4, int8 and dense matrix products for a few rows
on x86 CPUs (products.h), and a whole decode layer in one call (decode_layer.h, used by cpu_step.py).

Decoding one or two rows on the CPU spends its time in x @ W.T. For quantized weights neither PyTorch's
CPU kernels nor inductor's generated code come near the memory's speed: inductor converts every 4-bit
value with about one instruction per weight (docs/benchmarks.md), and eager code dequantizes the whole
weight on every call. The C++ kernels convert sixteen weights at a time (AVX-512; eight with AVX2), each
once for up to eight rows (AVX-512; four with AVX2), and keep fp32 activations, so their results equal the
dequantized weight's product up to the order of the additions. Dense weights get one too, for
uncompiled steps: PyTorch's BLAS call streams an fp32 weight at about a third of the memory's speed for one
row, and has no product of fp32 rows with the bf16 or fp16 weights a checkpoint stores, which the kernel
widens exactly as it reads them (devices.keeps_half_weights).

It is built on first use with torch.utils.cpp_extension (a C++ compiler, which torch.compile on the CPU
needs too, and ninja) for this machine's CPU, once, into ~/.cache/llama-cli/native/<key> (or
$LLAMA_CLI_CACHE/native/<key>); later processes load it in milliseconds. Where it cannot be built (no
compiler, not x86 with AVX2 and FMA), or with LLAMA_CLI_NATIVE=0, linear layers run as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("llama_cli")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "llama_cli_native.cpp"  # the one translation unit; it includes the headers beside it
_state: dict = {}  # "ok": bool once decided; "why": the reason it is off


def disabled_by_user() -> bool:
    return os.environ.get("LLAMA_CLI_NATIVE", "").strip().lower() in ("0", "off", "false", "no")


def available() -> bool:
    """Whether a model built now should use the kernels: not turned off (read at each build), and built here."""
    return not disabled_by_user() and ready()


def _cpu_flags() -> Optional[set]:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _cpu_ok() -> Optional[str]:
    """None where the kernels' vector code runs here, else why not."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"not built for {sys.platform}/{platform.machine()} (x86-64 Linux only)"
    flags = _cpu_flags()
    if flags is None:
        return "its CPU flags cannot be read"
    if not {"avx2", "fma"} <= flags:
        return "this CPU has no AVX2/FMA"
    return None


def _build_dir() -> Path:
    """Where this source, built for this CPU (-march=native) by this compiler against this torch, is kept."""
    import shutil

    import torch

    from .compiled import cache_root

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or ""
    sources = [(f.name, f.read_text()) for f in sorted(CSRC.iterdir()) if f.suffix in (".cpp", ".h")]
    desc = [sources, torch.__version__, sorted(_cpu_flags() or ()), cxx]
    return cache_root() / "native" / hashlib.sha256(repr(desc).encode()).hexdigest()[:16]


def ready() -> bool:
    """Whether torch.ops.llama_cli's int4_gemv, int8_gemv, dense_gemv and decode_layer can be called (building
    or loading them on first use)."""
    if "ok" in _state:
        return _state["ok"]
    why = "LLAMA_CLI_NATIVE=0" if disabled_by_user() else _cpu_ok()
    build = _build_dir() if why is None else None
    if why is None and not _loadable(build):
        from .compiled import room_problem

        why = room_problem(build)
        if why is not None:
            why = f"were not built: {why}"
            log.warning("our CPU kernels %s; linear layers use the slower portable products (make room there, "
                        "or set LLAMA_CLI_CACHE to another folder)", why)
    if why is None:
        try:
            _load(build)
        except Exception as e:  # a missing compiler or ninja, a failed build: the portable code path runs
            why = f"could not be built ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
            log.warning("our CPU kernels %s; linear layers use the slower portable products", why)
    _state["ok"], _state["why"] = why is None, why
    return why is None


def _loadable(build: Path) -> bool:
    """Whether a finished build is kept in `build` (_load then loads it without building): its library and the
    "ready" file written once a build has finished (processes may build at the same time)."""
    return (build / "ready").is_file() and (build / "llama_cli_native.so").is_file()


def _load(build: Path) -> None:
    import time

    import torch

    start = time.perf_counter()
    if not (_loadable(build) and _load_kept(build)):
        _build(build)
    log.debug("our CPU kernels ready in %.2f s", time.perf_counter() - start)

    @torch.library.register_fake("llama_cli::int4_gemv")
    def _(x, q, scale, offset):  # shapes for torch.compile's tracing
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("llama_cli::int8_gemv")
    def _(x, q, scale):
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("llama_cli::dense_gemv")
    def _(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))


def _load_kept(build: Path) -> bool:
    """Load the build kept in `build`; False (its files removed) where it is damaged on disk."""
    import torch

    try:
        torch.ops.load_library(str(build / "llama_cli_native.so"))
        return True
    except OSError as e:  # built again (ninja would keep the file)
        log.info("our kept CPU kernels in %s would not load (%s); building them again", build,
                 (str(e).splitlines() or [type(e).__name__])[0])
        (build / "ready").unlink(missing_ok=True)
        (build / "llama_cli_native.so").unlink(missing_ok=True)
        return False


def _build(build: Path) -> None:
    """Build the kernels into `build` and load them, one process at a time. The processes take turns on a
    lock the system drops when its holder ends, however it ends: torch's own lock file, which it leaves
    behind when its builder is killed (SIGKILL, the OOM killer, torchrun ending its workers), would make
    every later run wait for it for ever; the turn's holder removes that one."""
    from .locks import BUSY, UNLOCKED, try_lock, wait_lock

    build.mkdir(parents=True, exist_ok=True)
    with open(build / "build.lock", "a") as turn:
        state = try_lock(turn)
        if state == BUSY:
            log.info("waiting for another process building our CPU kernels in %s", build)
            wait_lock(turn)
        held = state != UNLOCKED  # without locks, torch's lock file alone
        if _loadable(build) and _load_kept(build):  # the other process built them
            return
        try:  # the ninja that pip installs with us, even where its folder is not on PATH (an unactivated venv)
            import ninja

            os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + ninja.BIN_DIR
        except (ImportError, AttributeError):
            pass  # a ninja on PATH, if any
        from torch.utils import cpp_extension

        log.info("building our CPU kernels for this machine (once per machine, 10-20 s) in %s", build)
        if held:
            (build / "lock").unlink(missing_ok=True)  # torch's, left by a killed build (no build holds it now)
        cpp_extension.load("llama_cli_native", [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                           verbose=False)
        (build / "ready").write_text("built\n")


def use_dense(model) -> int:
    """Mark a CPU model's dense linear layers for dense_gemv in uncompiled steps, where the kernels build and the
    activations are fp32 (the weights fp32, or bf16/fp16 as stored); how many it marked. (Compiled steps keep
    inductor's fused multiply-and-sum, which streams as fast.)"""
    import torch

    from .parallel import _Linear

    if model.norm.weight.dtype != torch.float32:  # bf16/fp16 activations: PyTorch's own products
        return 0
    layers = [m for m in model.modules() if isinstance(m, _Linear) and m.weight is not None and m.kernel is None
              and m.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
              and m.weight.device.type == "cpu" and m.weight.is_contiguous()]
    if not layers or not available():
        return 0
    for m in layers:
        m.kernel = "dense-native"
    return len(layers)


def dense_linear(x, weight):
    """x @ weight.T for a layer use_dense marked: our operator for fp32 rows uncompiled (its kernel for a few
    rows, BLAS beyond, a half-width weight widened first: csrc/products.h decides), else as before."""
    import torch

    from .parallel import linear

    x2 = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() or x.dtype != torch.float32:
        return linear(x, weight)
    return torch.ops.llama_cli.dense_gemv(x2.contiguous(), weight).reshape(*x.shape[:-1], weight.shape[0])
