"""`llama-cli reshard`: write a checkpoint split for a different number of processes.

Loading already reshards on the fly; this is for users who want to do it once (for Meta's
reference code, or to keep per-rank reads minimal). It is one more source for the writer that
`convert` uses (convert/writer.py): whole tensors go in one at a time, assembled from the input
shards, and come out split, staged and saved the same way; a tied output layer stays tied.
"""

from __future__ import annotations

import logging
import time

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
      dtype: precision to store (fp32, bf16, fp16). Default is as stored in ckpt_dir.
      tokenizer_path: tokenizer to take vocab_size from when params.json says -1. Default is the one
        in ckpt_dir or its parent folder. Tokenizer files in ckpt_dir are copied to --out.
    """
    import torch

    from . import checkpoint
    from .convert.writer import CheckpointWriter, copy_tokenizer_files
    from .devices import pick_dtype

    files, params, args = checkpoint.open_for_rewrite(ckpt_dir, out, tokenizer_path)
    if shards is None:
        raise UserError("--shards is required: how many shards to write (the number of processes the copy is for)")
    start = time.perf_counter()
    reader = checkpoint.CheckpointReader(files, args)
    stored = reader.shard(0)["norm.weight"].dtype
    target = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else stored
    writer = CheckpointWriter(out, shards, target, args)
    n = writer.write(reader.full_tensors(), params, lambda dest: copy_tokenizer_files(ckpt_dir, dest))
    reader.close()
    log.info("resharded %s (%d shard(s)) into %s: %d tensors in %d shard(s), %s, in %.1f s", ckpt_dir, len(files),
             out, n, shards, str(target).replace("torch.", ""), time.perf_counter() - start)
    return 0
