"""`llama-cli convert`: HuggingFace Llama folders and GGUF files into Meta's checkpoint layout."""

from __future__ import annotations

import logging
import os
import time

from ..errors import UserError
from ..settings import check_path

log = logging.getLogger("llama_cli")


def convert(src=None, out=None, shards=1, dtype=None, dequantize=False):
    """Convert a HuggingFace Llama folder or a llama GGUF file into a Meta checkpoint folder.

    Examples:
      llama-cli convert --src SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m
      llama-cli convert --src Llama-3.2-1B/ --out checkpoints/llama-3.2-1b --shards 2 --dtype bf16

    Args:
      src: a HuggingFace model folder (config.json, *.safetensors or *.bin, tokenizer files), or a
        GGUF file of architecture llama (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ... dequantized).
      out: the folder to write consolidated.NN.pth, params.json and the tokenizer into.
      shards: how many shards to write (for that many model-parallel processes).
      dtype: precision to store: fp32, bf16 or fp16. Default: as stored for HF folders, fp32 for GGUF
        (dequantized values are exact in fp32; bf16 halves the size).
      dequantize: GGUF only. By default linear layers stored as Q8_0, Q4_0 or Q4_1 stay quantized (int8 or
        int4 with groups of 32, exactly the file's values; the checkpoint stays near the file's size), the
        other types are dequantized. --dequantize dequantizes everything.
    """
    import torch

    from ..devices import pick_dtype
    from .writer import CheckpointWriter

    if src is None or out is None:
        raise UserError("convert needs --src (HF folder or .gguf file) and --out (the folder to write)")
    src, out = str(src), str(out)
    start = time.perf_counter()
    if os.path.isdir(src):
        from . import hf as source

        check_path(src, "--src")  # safetensors and the tokenizer libraries read from it (a GGUF file: Python)
    elif os.path.isfile(src):
        from . import gguf as source

        if not source.is_gguf(src):
            raise UserError(f"{src} is neither a GGUF file nor a HuggingFace model folder")
    else:
        raise UserError(f"--src {src} does not exist")
    if not isinstance(dequantize, bool):
        raise UserError("--dequantize is a switch: write --dequantize")
    params, args, stored, tensors = source.read(src, dequantize) if source.__name__.endswith("gguf") \
        else source.read(src)
    target = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else stored
    copied: list = []
    n = CheckpointWriter(out, shards, target, args).write(
        tensors, params, lambda dest: copied.extend(source.write_tokenizer(src, dest)))
    log.info("converted %s into %s: %d tensors in %d shard(s), %s, in %.1f s", src, out, n, shards,
             ", ".join(copied), time.perf_counter() - start)
    return 0
