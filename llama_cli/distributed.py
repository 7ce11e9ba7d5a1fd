"""Where this process runs: world size and rank, device, dtype, and the process groups.

Works under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) and in a plain process
with none of those set (a world of one, which needs no process group). The backend is
NCCL when the device is a CUDA GPU and NCCL is built, gloo otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from typing import Optional, Union

import torch
import torch.distributed as dist

from .errors import UserError
from .parallel import ModelParallel

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from an initialised process group or torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    try:
        return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; launch with torchrun or unset them") from None


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


def is_cuda(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU (without spelling the device name out)."""
    return device.type != "cpu" and torch.get_device_module(device.type) is torch.cuda


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
        kwargs = {"device_id": device} if backend_for(device) == "nccl" else {}
        dist.init_process_group(backend_for(device), **kwargs)
        atexit.register(teardown)  # gloo can abort at exit when its group is left alive
    from fairscale.nn.model_parallel import initialize as fs

    if not fs.model_parallel_is_initialized():
        with contextlib.redirect_stdout(sys.stderr):  # fairscale prints progress; stdout is for results
            fs.initialize_model_parallel(world_size)
    return ModelParallel(world_size=world_size, rank=fs.get_model_parallel_rank(), group=fs.get_model_parallel_group())


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
