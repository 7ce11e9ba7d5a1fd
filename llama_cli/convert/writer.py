"""Writing a Meta-layout checkpoint folder one tensor at a time: the one writer behind `convert`
(HF folders, GGUF files) and `reshard` (Meta folders).

Each incoming (whole) tensor is cast, split for the target shard count the way fairscale
splits it, and staged into a file-backed tensor in a temporary folder beside the output, so
the converter's own memory stays near the largest single tensor; each shard is then saved
with torch.save from those staged tensors. Staging files are given their disk space before they are
mapped: a full disk is then one error naming the folder, not a bus error of a write through the map;
the shards are saved only where the disk has room for them beside the staged tensors. A writer holds a lock
(flock) on its staging folder: a second writer into the same folder is refused, and staging folders that
writers killed outright left (SIGKILL, the OOM killer: their locks free) are removed by the next one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable, Optional

import torch

from ..checkpoint import QPARTS, split_dim
from ..errors import RuntimeFailure, UserError
from ..locks import BUSY, HELD, UNLOCKED, try_lock
from ..model import ModelArgs, check_parallel
from ..settings import check_path
from ..tokenizer import TOKENIZER_FILES

log = logging.getLogger("llama_cli")

STAGING = ".convert-"  # the staging folders' prefix
OWNER = ".writing"  # the file in each that its writer holds locked


def copy_tokenizer_files(src_dir: str, out: str) -> list[str]:
    """Copy the tokenizer files found in src_dir into out; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))
            copied.append(name)
    return copied


class CheckpointWriter:
    def __init__(self, out: str, n_shards: int, dtype: torch.dtype, args: ModelArgs):
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
            raise UserError(f"--shards must be a positive integer, got {n_shards!r}")
        check_parallel(args, n_shards, shards=True)
        if n_shards > args.n_kv_heads:
            raise UserError(f"cannot write {n_shards} shards: the model has {args.n_kv_heads} KV heads and a shard "
                            f"must hold whole ones; write at most {args.n_kv_heads} shards, and run on {n_shards} "
                            "processes directly (loading splits further on the fly)")
        check_path(out, "--out")
        held = sorted(f for f in os.listdir(out) if f.endswith(".pth") or f == "params.json") \
            if os.path.isdir(out) else []
        if held and "params.json" not in held:  # shards written last go before params.json
            raise UserError(f"{out} holds {', '.join(held)} without params.json: a write into it that did not "
                            "finish? remove them, or choose an empty or new folder")
        if held:
            raise UserError(f"{out} already holds a checkpoint; choose an empty or new folder")
        self._made_out = not os.path.isdir(out)
        try:
            os.makedirs(out, exist_ok=True)
            self.staging = tempfile.mkdtemp(prefix=STAGING, dir=out)
        except OSError as e:
            raise UserError(f"cannot write to {out}: {e.strerror}") from None
        self.out, self.n_shards, self.dtype, self.args = out, n_shards, dtype, args
        self.shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
        self._count = 0
        self._staged = 0  # bytes
        self._written: list[str] = []  # the files saved so far (removed again if the write fails)
        self._owner = _hold(self.staging)
        try:
            _clear_others(out, self.staging)
        except BaseException:
            self._leave()
            raise

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Stage one whole tensor under its Meta name: weights are cast to the writer's dtype, quantized
        parts (QPARTS: integers and group tables) keep theirs."""
        dim = split_dim(name, tuple(tensor.shape)) if self.n_shards > 1 else None
        if dim is not None and tensor.shape[dim] % self.n_shards:
            groups = " (quantization groups are never cut)" if name.endswith(QPARTS) else ""
            raise UserError(f"'{name}' has {tensor.shape[dim]} along the dimension shards split; it does not divide "
                            f"into {self.n_shards} shards{groups}; write fewer shards (--shards 1 always works)")
        parts = [tensor] if dim is None else tensor.chunk(self.n_shards, dim=dim)
        dtype = tensor.dtype if name.endswith(QPARTS) else self.dtype
        for s in range(self.n_shards):
            # a fresh file-backed tensor per part: a narrowed view would save its whole storage
            part = parts[0] if dim is None else parts[s]
            path = os.path.join(self.staging, f"{self._count}.bin")
            self._count += 1
            self._allocate(path, part.numel() * dtype.itemsize)
            staged = torch.from_file(path, shared=True, size=part.numel(), dtype=dtype).view(part.shape)
            staged.copy_(part)
            self.shards[s][name] = staged

    def _allocate(self, path: str, nbytes: int) -> None:
        """The staging file, its blocks reserved (where the system can; macOS has no posix_fallocate)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if nbytes and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._full(e.strerror) from None
        self._staged += nbytes

    def _full(self, why: str) -> RuntimeFailure:
        free = shutil.disk_usage(self.out).free
        return RuntimeFailure(f"cannot write into {self.out}: {why} ({self._staged / 2**20:.0f} MB staged, "
                              f"{free / 2**20:.0f} MB free); writing a checkpoint needs about twice its size free "
                              "there until it is done (the tensors staged, then the shards): free some space or "
                              "choose another --out; nothing was left behind")

    def write(self, tensors: Iterable[tuple[str, torch.Tensor]], params: dict,
              tokenizer: Optional[Callable[[str], object]] = None) -> int:
        """Stage every (Meta name, whole tensor) and save the shards, then the files `tokenizer(out)` writes,
        then params.json: the last file, so a folder with one is complete, also after a kill. Returns the
        tensor count. Nothing is left behind if it fails."""
        count = 0
        try:
            for name, t in tensors:
                self.add(name, t)
                count += 1
            self.finish(params, tokenizer)
        except BaseException:
            self._leave()
            raise
        return count

    def _leave(self) -> None:
        """Remove whatever this writer put there (the folder held no checkpoint files before: checked at the
        start), and the folder where it made it."""
        self.abort()
        for path in self._written:
            if os.path.exists(path):
                os.remove(path)
        if self._made_out and not os.listdir(self.out):
            os.rmdir(self.out)

    def finish(self, params: dict, tokenizer: Optional[Callable[[str], object]] = None) -> None:
        """Save every shard, the tokenizer's files (write's) and params.json; remove the staging files."""
        try:
            if shutil.disk_usage(self.out).free < self._staged + 2**20:  # the shards hold what is staged
                raise self._full("not enough space for the shards")
            for s, sd in enumerate(self.shards):
                path = os.path.join(self.out, f"consolidated.{s:02d}.pth")
                self._written.append(path)
                try:
                    torch.save(sd, path)
                except (OSError, RuntimeError):  # torch's zip writer reports a failed write as RuntimeError
                    if shutil.disk_usage(self.out).free > 2**20:
                        raise
                    raise self._full("the disk filled up") from None
                sd.clear()
            if tokenizer is not None:
                had = set(os.listdir(self.out))  # tokenizer files there before are overwritten, not removed
                try:
                    tokenizer(self.out)
                finally:
                    self._written += [os.path.join(self.out, n) for n in sorted(set(os.listdir(self.out)) - had)]
            self._written.append(os.path.join(self.out, "params.json"))
            with open(self._written[-1], "w", encoding="utf-8") as f:
                json.dump(params, f, indent=2)
        finally:
            self.abort()

    def abort(self) -> None:
        self.shards = [{} for _ in range(self.n_shards)]
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None


def _hold(staging: str):
    """A descriptor holding the lock on `staging`'s OWNER file (the system drops it when this process ends,
    however it ends); None where the platform or the file system has no locks."""
    fd = os.open(os.path.join(staging, OWNER), os.O_RDWR | os.O_CREAT, 0o600)
    if try_lock(fd) != HELD:
        os.close(fd)
        return None
    return fd


def _clear_others(out: str, own: str, settle_s: float = 5.0) -> None:
    """Refuse to write into `out` while another writer writes there (its staging folder locked); remove the
    staging folders that writers killed outright left (unlocked; older than settle_s, so as not to take one
    whose writer has only just made it)."""
    for entry in os.scandir(out):
        if not entry.name.startswith(STAGING) or entry.path == own or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, OWNER), os.O_RDWR)
        except OSError:
            continue  # not ours to judge
        try:
            state = try_lock(fd)
            if state == BUSY:
                raise UserError(f"{out} is being written by another llama-cli run now; wait for it to end, or "
                                "choose another --out")
            if state == UNLOCKED:
                continue
            if time.time() - entry.stat().st_mtime < settle_s:
                continue
            size = sum(f.stat().st_size for f in os.scandir(entry.path) if f.is_file(follow_symlinks=False))
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed %s (%.0f MB), left in %s by a run that was killed while writing there", entry.name,
                     size / 2**20, out)
        finally:
            os.close(fd)
