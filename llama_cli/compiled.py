"""Compiled decode steps kept across runs.

The engine compiles one transformer layer and the output layer (engine.py); inductor keeps what
it compiled in its on-disk cache, which we place under ~/.cache/llama-cli/inductor (or
$LLAMA_CLI_CACHE/inductor; TORCHINDUCTOR_CACHE_DIR, when set, wins) so it survives reboots
and /tmp cleaners; so do the precompiled headers it compiles its C++ against (setup). Beside it,
one marker file per model shape says "compiled before": with `--compile auto` a run whose shape
has a marker compiles at once (a cache hit: a second or two), one without compiles only when the
job is long enough to pay for it. `llama-cli compile` makes the marker ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional


# whether the user chose inductor's cache folder (torch itself sets the variable once it has looked)
_USER_CHOSE = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_CLI_CACHE") or Path.home() / ".cache" / "llama-cli")


ROOM_MB = 64  # what a compile or our kernels' build may write into the cache (a model's compiled steps: ~20 MB)
HEADER_ROOM_MB = 256  # and a first compile's precompiled header (150-160 MB on the CPU)


def inductor_dir() -> Path:
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) if _USER_CHOSE else cache_root() / "inductor"


def compile_room_problem() -> Optional[str]:
    """room_problem for a compile: inductor's cache, and room for a precompiled header where none is kept yet."""
    kept = any(header_dir().glob("*.gch"))
    return room_problem(inductor_dir(), ROOM_MB if kept else HEADER_ROOM_MB)


def header_dir() -> Path:
    return inductor_dir() / "precompiled_headers"


def room_problem(path: Path, room_mb: int = ROOM_MB) -> Optional[str]:
    """None where `path` (made if missing) can take room_mb more, else what is wrong, in words: a full disk
    fails a compile or a build only after its seconds of work, and then with a compiler's message."""
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder (LLAMA_CLI_CACHE names the folder to keep builds in)"
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None  # nothing to tell: the attempt itself will say
    if free < room_mb * 2**20:
        return f"the disk holding {path} has {free / 2**20:.0f} MB free (about {room_mb} MB are needed there)"
    if not os.access(probe, os.W_OK):
        return f"{probe} is not writable"
    return None


def setup() -> None:
    """Point inductor's cache at ours (before anything is compiled), and skip inductor's vector-ISA probe
    where an earlier run here recorded its outcome (see _isa_record)."""
    if not _USER_CHOSE:
        path = cache_root() / "inductor"
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        except OSError:
            pass  # an unwritable home: inductor's default (/tmp) still works within this boot
    _keep_headers()
    _reuse_isa_probe()


def _keep_headers() -> None:
    """Inductor keeps the precompiled headers its C++ is compiled against (150-160 MB each on the CPU) in
    /tmp/torchinductor_<user>, whatever TORCHINDUCTOR_CACHE_DIR says, and makes one again, 8-11 s on the 2-core
    VM, in the first run after /tmp was emptied (a reboot), even where the compiled step itself is kept: that
    run's warm start took 13.1 s instead of ~4.6. They are kept beside the rest of inductor's cache instead."""
    try:
        from torch._inductor import codecache

        if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
            codecache._HEADER_DIR = str(header_dir())
            codecache._HEADER_LOCK_DIR = str(header_dir() / "locks")
    except ImportError:
        pass


# Inductor decides which CPU vector instructions (AVX2, AVX-512, ...) its kernels may use by building a
# probe library and loading it in a fresh Python process, in every process: about 1.1 s of each warm
# start on this VM. Its outcome depends on the CPU, the compiler and torch only, so the first run here
# probes (before compiling anything) and records the outcome; where every vector ISA the CPU claims
# passed, that run and later ones tell inductor so (config.cpp.vec_isa_ok), which is exactly what the
# probe finds. (The setting is part of inductor's cache key: the first run must set it too, or the
# second would miss the cache.) Its finer checks (AVX-512 BF16, VNNI, AMX, AMX-FP16) still build and load
# a library each, whatever vec_isa_ok says: six new Python processes, 0.7-1.2 s of each warm start on an
# AMX Xeon. The record also lists the probe libraries that loaded (_probe_load): on the same machine the
# same library loads again, so a listed one that is still there counts as loaded without a new process.
def _isa_fingerprint() -> Optional[tuple[str, list[str]]]:
    """(fingerprint of CPU flags, compiler and torch; the ISAs the CPU claims), or None off x86 Linux."""
    import platform
    import shutil
    import sys

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    import torch
    from torch._inductor import cpu_vec_isa as v

    flags = v.x86_isa_checker()
    claimed = [str(isa) for isa in v.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or ""
    desc = [torch.__version__, sys.executable, sorted(flags), cxx]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:20], claimed


def _isa_record() -> Path:
    return cache_root() / "compiled" / "vec_isa.json"


def _reuse_isa_probe() -> None:
    try:
        import torch._inductor.config as config

        if "TORCHINDUCTOR_VEC_ISA_OK" in os.environ or config.cpp.vec_isa_ok is not None:
            return
        fp = _isa_fingerprint()
        if fp is None:
            return
        try:
            rec = json.loads(_isa_record().read_text())
        except (OSError, ValueError):
            rec = None
        from torch._inductor import cpu_vec_isa as v

        real = getattr(v.VecISA, "_probe_load", None)  # (another torch may have none: then it probes as before)
        if real is not None and real is not _probe_load:
            _probes["real"] = real
            v.VecISA._probe_load = _probe_load
        fresh = not isinstance(rec, dict) or rec.get("fingerprint") != fp[0]
        if fresh:
            rec = {"fingerprint": fp[0], "loaded": []}
        _probes.update(record=_isa_record(), rec=rec)
        if fresh:
            rec["passed"] = [str(isa) for isa in v.valid_vec_isa_list()]  # the probe (its loads listed)
            _write_record(_isa_record(), rec)
        if rec.get("passed") == fp[1] and fp[1]:
            config.cpp.vec_isa_ok = True
    except (ImportError, AttributeError):  # another torch's internals: inductor probes as usual
        pass


_probes: dict = {}  # "real": inductor's VecISA._probe_load; "record": the record's path; "rec": its contents


def _probe_load(isa, output_path: str) -> bool:
    """Inductor's check that a probe library loads (a new Python process that loads it), skipped for a library
    that loaded before on this machine (listed in the record under its fingerprint) and is still there."""
    rec = _probes["rec"]  # (set with the patch, in _reuse_isa_probe)
    loaded = rec.get("loaded") if isinstance(rec.get("loaded"), list) else []
    if output_path in loaded and os.path.isfile(output_path):
        return True
    ok = _probes["real"](isa, output_path)
    if ok:
        rec["loaded"] = sorted({str(p) for p in loaded} | {output_path})
        if "passed" in rec:  # (the first probe writes the record once it is done)
            _write_record(_probes["record"], rec)
    return ok


def _write_record(path: Path, rec: dict) -> None:
    """Write the record whole or not at all (runs started together may write it at once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def shape_key(model, dtype, device, cache_shape: tuple[int, int] = (1, 64), kv_dtype=None) -> str:
    """What the compiled step depends on: one layer's (local) shapes, the output layer, the KV cache's
    (rows, length) (weights and caches are module state, whose shapes dynamo keeps static) and its type where it
    is not dtype's, the dtype, the device kind, the process count and the torch version, and on the CPU the
    thread count (inductor's C++ kernels are made for it: its cache misses under another); not the layer count."""
    import torch

    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward

    def form(m):  # a linear layer's weight: shape and storage (dense, or quantized with its group count)
        if m.weight is not None:  # (a dense weight's dtype where it is kept apart from the activations')
            return list(m.weight.shape) + ([str(m.weight.dtype)] if m.weight.dtype != dtype else [])
        return [list(m.qweight.shape), str(m.qweight.dtype), list(m.qscale.shape), m.qoffset is not None]

    desc = {"dim": model.params.dim, "heads": attn.n_local_heads, "kv_heads": attn.n_local_kv_heads,
            "head_dim": attn.head_dim, "w1": form(ffn.w1), "w2": form(ffn.w2), "wq": form(attn.wq),
            "wo": form(attn.wo), "output": form(model.output), "fused": attn.wqkv is not None, "dtype": str(dtype),
            "device": device.type, "world": model.mp.world_size, "torch": torch.__version__,
            "cache": list(cache_shape)}
    if kv_dtype is not None and kv_dtype != dtype:
        desc["kv_dtype"] = str(kv_dtype)
    if device.type == "cpu":
        desc["threads"] = torch.get_num_threads()
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _marker(key: str) -> Path:
    return cache_root() / "compiled" / f"{key}.json"


def is_warm(key: str) -> bool:
    return _marker(key).is_file()


def mark_warm(key: str) -> None:
    try:
        _marker(key).parent.mkdir(parents=True, exist_ok=True)
        _marker(key).write_text("{}\n")
    except OSError:
        pass
