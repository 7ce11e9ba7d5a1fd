"""Compiled decode steps kept across runs.

The engine compiles one transformer layer and the output layer (engine.py); inductor keeps what
it compiled in its on-disk cache, which we place under ~/.cache/llama-cli/inductor (or
$LLAMA_CLI_CACHE/inductor; TORCHINDUCTOR_CACHE_DIR, when set, wins) so it survives reboots
and /tmp cleaners. Beside it, one marker file per model shape says "compiled before": with
`--compile auto` a run whose shape has a marker compiles at once (a cache hit: a second or two),
one without compiles only when the job is long enough to pay for it. `llama-cli compile` makes
the marker ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


# whether the user chose inductor's cache folder (torch itself sets the variable once it has looked)
_USER_CHOSE = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_CLI_CACHE") or Path.home() / ".cache" / "llama-cli")


def setup() -> None:
    """Point inductor's cache at ours (before anything is compiled)."""
    if not _USER_CHOSE:
        path = cache_root() / "inductor"
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        except OSError:
            pass  # an unwritable home: inductor's default (/tmp) still works within this boot


def shape_key(model, dtype, device) -> str:
    """What the compiled step depends on: one layer's (local) shapes, the output layer, the dtype,
    the device kind, the process count and the torch version; not the layer count."""
    import torch

    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward

    def form(m):  # a linear layer's weight: shape and storage (dense, or quantized with its group count)
        if m.weight is not None:
            return list(m.weight.shape)
        return [list(m.qweight.shape), str(m.qweight.dtype), list(m.qscale.shape), m.qoffset is not None]

    desc = {"dim": model.params.dim, "heads": attn.n_local_heads, "kv_heads": attn.n_local_kv_heads,
            "head_dim": attn.head_dim, "w1": form(ffn.w1), "w2": form(ffn.w2), "wq": form(attn.wq),
            "wo": form(attn.wo), "output": form(model.output), "fused": attn.wqkv is not None, "dtype": str(dtype),
            "device": device.type, "world": model.mp.world_size, "torch": torch.__version__}
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
