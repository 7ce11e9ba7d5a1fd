"""`llama-cli reshard`: write a checkpoint split for a different number of processes.

Loading already reshards on the fly; this is for users who want to do it once (for Meta's
reference code, or to keep per-rank reads minimal). One output shard is assembled at a time
from the memory-mapped input, so peak memory stays near one output shard.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from .errors import UserError

log = logging.getLogger("llama_cli")


def reshard(ckpt_dir=None, out=None, shards=None, dtype=None, tokenizer_path=None):
    """Rewrite a Meta checkpoint folder with a different number of consolidated.NN.pth shards.

    Example:
      llama-cli reshard --ckpt_dir llama-2-13b --out llama-2-13b-1shard --shards 1

    Args:
      ckpt_dir: the checkpoint folder to read (consolidated.NN.pth + params.json).
      out: the folder to write; must not already hold a checkpoint.
      shards: how many shards to write (the number of processes the copy is meant for).
      dtype: precision to store (fp32, bf16, fp16); default: as stored in ckpt_dir.
      tokenizer_path: tokenizer to take vocab_size from when params.json says -1; default: the one
        in ckpt_dir or its parent folder. Tokenizer files in ckpt_dir are copied to --out.
    """
    import torch

    from . import checkpoint
    from .distributed import pick_dtype
    from .model import check_parallel
    from .tokenizer import TOKENIZER_FILES, find_tokenizer, load_tokenizer

    if out is None:
        raise UserError("--out is required: the folder to write the resharded checkpoint to")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise UserError(f"--shards must be a positive integer, got {shards!r}")
    files, params_path = checkpoint.find_checkpoint(ckpt_dir)
    params = checkpoint.read_params(params_path)
    args = checkpoint.load_args(params_path)
    if os.path.abspath(out) == os.path.abspath(ckpt_dir):
        raise UserError("--out must be a different folder from --ckpt_dir")
    if os.path.isdir(out) and any(f.endswith(".pth") or f == "params.json" for f in os.listdir(out)):
        raise UserError(f"{out} already holds a checkpoint; choose an empty or new folder")
    tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
    if not os.path.isfile(tokenizer_path):
        tokenizer_path = None
    if args.vocab_size == -1:
        if tokenizer_path is None:
            raise UserError("params.json has vocab_size -1 and no tokenizer was found; pass --tokenizer_path")
        args.vocab_size = load_tokenizer(tokenizer_path).n_words
    check_parallel(args, shards)
    if shards > args.n_kv_heads:
        raise UserError(f"cannot write {shards} shards: the model has {args.n_kv_heads} KV heads and a shard must "
                        f"hold whole ones; write at most {args.n_kv_heads} shards, and run on {shards} processes "
                        "directly (loading splits further on the fly)")
    reader = checkpoint.CheckpointReader(files, args)
    stored = reader.shard(0)["tok_embeddings.weight"].dtype
    target = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else stored
    os.makedirs(out, exist_ok=True)
    for r in range(shards):
        state = reader.rank_state_dict(shards, r, target)
        path = os.path.join(out, f"consolidated.{r:02d}.pth")
        torch.save(state, path)
        del state
        log.info("wrote %s", path)
    with open(os.path.join(out, "params.json"), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            shutil.copyfile(os.path.join(ckpt_dir, name), os.path.join(out, name))
    log.info("resharded %s (%d shard(s)) into %s (%d shard(s), %s)", ckpt_dir, len(files), out, shards,
             str(target).replace("torch.", ""))
    return 0
