"""Where this process runs among others: world size and rank, and the process groups.

Works under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) and in a plain process
with none of those set (a world of one, which needs no process group). The backend is
NCCL when the device is a CUDA GPU and NCCL is built, gloo otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import sys
import threading
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from .errors import UserError
from .parallel import ModelParallel


def world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from an initialised process group or torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    try:
        world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise _own_launch("WORLD_SIZE, RANK and LOCAL_RANK must be integers; launch with torchrun or unset "
                          "them") from None
    if world_size < 1:
        raise _own_launch(f"WORLD_SIZE={world_size}: a world needs at least 1 process; launch with torchrun, or unset "
                          "WORLD_SIZE and RANK")
    if not 0 <= rank < world_size:
        named = f"WORLD_SIZE={world_size}" if "WORLD_SIZE" in os.environ else "WORLD_SIZE (unset: 1)"
        raise _own_launch(f"RANK={rank} is not one of the {world_size} process(es) of {named}, ranks 0 to "
                          f"{world_size - 1}; launch with torchrun, or unset WORLD_SIZE and RANK")
    return world_size, rank, local_rank


def backend_for(device: torch.device) -> str:
    if device.type != "cpu" and dist.Backend.default_device_backend_map.get(device.type) == "nccl" \
            and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def setup(device: torch.device, model_parallel_size: Optional[int] = None) -> ModelParallel:
    """Initialise torch.distributed and fairscale's model-parallel groups when the world is > 1."""
    world_size, rank, _ = world()
    if model_parallel_size is not None and model_parallel_size != world_size:
        raise UserError(f"model_parallel_size={model_parallel_size} but {world_size} process(es) were launched; "
                        f"launch with torchrun --nproc_per_node {model_parallel_size} or leave it unset")
    if world_size == 1:
        return ModelParallel()
    if not dist.is_initialized():
        where = _meeting_point(world_size)
        if rank == 0:
            logging.getLogger("llama_cli").info("waiting for the other %d process(es) at %s (%s)", world_size - 1,
                                                where, backend_for(device))
        kwargs = {"device_id": device} if backend_for(device) == "nccl" else {}
        dist.init_process_group(backend_for(device), **kwargs)
        atexit.register(teardown)  # gloo can abort at exit when its group is left alive
    from fairscale.nn.model_parallel import initialize as fs

    if not fs.model_parallel_is_initialized():
        # fairscale prints progress ("> initializing model parallel ..."); stdout is for results, and
        # --quiet (or a rank other than 0) hides it
        quiet = logging.getLogger("llama_cli").level > logging.INFO or rank != 0
        with contextlib.redirect_stdout(open(os.devnull, "w") if quiet else sys.stderr):
            fs.initialize_model_parallel(world_size)
    return ModelParallel(world_size=world_size, rank=fs.get_model_parallel_rank(), group=fs.get_model_parallel_group())


def _own_launch(message: str) -> UserError:
    e = UserError(message)
    e.every_rank = True  # a process launched alone with a stray RANK=1 must still say it
    return e


def _meeting_point(world_size: int) -> str:
    """MASTER_ADDR:MASTER_PORT, where the processes meet (torchrun sets them); a UserError where a world of
    several was asked for without them (WORLD_SIZE left in the environment by a job script, say). world() has
    checked WORLD_SIZE and RANK."""
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise _own_launch(f"WORLD_SIZE={world_size} makes this one of {world_size} processes, but "
                          f"{' and '.join(missing)} (where they meet) {'is' if len(missing) == 1 else 'are'} not set: "
                          f"launch with torchrun --nproc_per_node {world_size} -m llama_cli ..., or unset WORLD_SIZE "
                          "and RANK to run as one process")
    return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        from fairscale.nn.model_parallel import initialize as fs

        fs.destroy_model_parallel()
        dist.destroy_process_group()


def broadcast_json(obj, device: torch.device):
    """Rank 0's JSON-serialisable `obj`, on every rank (no pickling)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    if backend_for(device) != "nccl":
        device = torch.device("cpu")
    if dist.get_rank() == 0:
        data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    else:
        size = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().tolist()).decode("utf-8"))


HEARTBEAT_S = 60.0  # well inside NCCL's default collective timeout (10 minutes) and gloo's (30)


def shared_lines(lines: Iterable[str], device: torch.device, heartbeat_s: float = HEARTBEAT_S,
                 stop=None) -> Iterator[str]:
    """The lines rank 0 reads from `lines`, on every rank, each as rank 0 takes it (the other ranks never read
    their own `lines`: under torchrun they would race rank 0 for the same standard input). A person may take
    minutes to type a line: while rank 0 waits, it tells the others so every heartbeat_s seconds, so that no
    rank waits in one collective long enough for it to time out. stop (rank 0's): a callable, true when no more
    lines are wanted (its standard output closed): the lines end there on every rank. One process: `lines`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield from lines
        return
    if dist.get_rank() != 0:
        while (message := broadcast_json(None, device)) is not None:
            if "line" in message:  # else a heartbeat
                yield message["line"]
        return
    taken: queue.Queue = queue.Queue(maxsize=1)

    def read() -> None:
        try:
            for line in lines:
                taken.put(("line", line))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            taken.put(("error", e))
        taken.put(("end", None))

    threading.Thread(target=read, daemon=True, name="llama-cli stdin").start()
    while True:
        try:
            kind, value = taken.get(timeout=heartbeat_s)
        except queue.Empty:
            broadcast_json({}, device)
            continue
        if kind == "error":
            raise value
        if kind == "end" or (stop is not None and stop()):
            broadcast_json(None, device)
            return
        broadcast_json({"line": value}, device)
        yield value
