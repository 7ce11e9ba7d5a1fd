"""Run under torchrun by test_chat.py: distributed.shared_lines with a short heartbeat while rank 0's lines come
slowly (a person typing); writes the lines each rank got and the broadcasts it took part in."""
import json
import sys
import time

import torch
import torch.distributed as dist

from llama_cli import distributed

dist.init_process_group("gloo")
rank = dist.get_rank()
calls = []
plain = distributed.broadcast_json


def counted(obj, device):
    calls.append(plain(obj, device))
    return calls[-1]


distributed.broadcast_json = counted


def typed():
    for line in ["hello\n", "caf\udce9 (not UTF-8)\n", "\n", "/exit\n"]:
        time.sleep(0.3)
        yield line


mine = typed() if rank == 0 else iter(["rank 1 must not read its own standard input\n"])
lines = list(distributed.shared_lines(mine, torch.device("cpu"), heartbeat_s=0.05))
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    json.dump({"lines": lines, "heartbeats": calls.count({}), "broadcasts": len(calls)}, f)
dist.destroy_process_group()
