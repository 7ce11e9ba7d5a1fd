"""Run under torchrun (or plain python) by the tests: greedy-generate and write the tokens as JSON."""
import json
import os
import sys

import torch.distributed as dist

from llama_cli import Llama

ckpt, tokenizer, out = sys.argv[1:4]
prompts = sys.argv[4:] or ["Hello world", "The cat sleeps under the tree because", "42"]
llama = Llama.build(ckpt, tokenizer, max_seq_len=96, max_batch_size=int(os.environ.get("GEN_BATCH", 4)),
                    compile=os.environ.get("GEN_COMPILE", "off"), quantize=os.environ.get("GEN_QUANTIZE") or None)
ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
tokens, _ = llama.generate(ids, max_gen_len=24, temperature=0)
sampled, _ = llama.generate(ids, max_gen_len=12, temperature=0.9, top_p=0.9)
rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
with open(f"{out}.{rank}", "w") as f:
    # "native": decode steps ran as native calls per layer (cpu_step.py), where our CPU kernels build
    wq = llama.model.layers[0].attention.wq.weight  # None where quantized
    json.dump({"greedy": tokens, "sampled": sampled, "world": world, "native": llama.engine.native is not None,
               "linear_dtype": "quantized" if wq is None else str(wq.dtype)[6:]}, f)
