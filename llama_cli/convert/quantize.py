"""`llama-cli quantize`: write a quantized copy of a checkpoint folder (quant.py's forms).

The copy is a Meta-layout folder whose params.json records {"quantization": {"mode", "group_size",
"embeddings": {...}}}, so it loads with no extra flag, on any number of processes that its groups split
into: each linear weight "X.weight" becomes "X.weight.q" / ".scale" (/ ".offset" for int4), split across
shards along the same dimension as the weight, with whole groups in each shard. The token embeddings
become int8 with one scale per row (a tied output layer reads them in that form). It goes tensor by tensor through
the writer that convert and reshard use, so memory stays near the largest tensor.
"""

from __future__ import annotations

import logging
import time

from ..errors import UserError

log = logging.getLogger("llama_cli")


def quantize_checkpoint(ckpt_dir=None, out=None, mode=None, group_size=None, shards=None, dtype=None,
                        tokenizer_path=None):
    """Write a weight-only int8 or int4 copy of a checkpoint folder.

    Examples:
      llama-cli quantize --ckpt_dir llama-2-7b --out llama-2-7b-int8 --mode int8
      llama-cli quantize --ckpt_dir checkpoints/smollm2-135m --out checkpoints/smollm2-int4 --mode int4 --group_size 64

    Args:
      ckpt_dir: the checkpoint folder to read (consolidated.NN.pth + params.json).
      out: the folder to write; must not already hold a checkpoint.
      mode: int8 (one scale per output row, or per group) or int4 (groups along the input dimension).
      group_size: weights per group along the input dimension. int8 takes 0 (per row, the default),
        32, 64, 128 or 256; int4 takes 32 (the default, measured best), 64, 128 or 256.
      shards: how many shards to write. Default is as many as ckpt_dir has.
      dtype: precision of the weights left unquantized (the norms). Default is as stored. The token
        embeddings become int8 with one scale per row.
      tokenizer_path: tokenizer to take vocab_size from when params.json says -1.
    """
    import torch

    from .. import checkpoint
    from ..devices import pick_dtype
    from ..quant import check_mode, embedding_form, quantize
    from .writer import CheckpointWriter, copy_tokenizer_files

    if out is None or mode is None:
        raise UserError("quantize needs --ckpt_dir, --out (the folder to write) and --mode int8 or int4")
    mode, group_size = check_mode(mode, group_size, ("--mode", "--group_size"))
    files, params, args = checkpoint.open_for_rewrite(ckpt_dir, out, tokenizer_path)
    if args.quantization is not None:
        raise UserError(f"{ckpt_dir} is already quantized ({args.quantization['mode']}, group size "
                        f"{args.quantization['group_size']}); quantize the unquantized checkpoint instead")
    from ..quant import pick_group

    in_sizes = {name: shape[1] for name, (shape, _) in checkpoint.weight_table(args).items()
                if checkpoint.is_linear(name)}
    group_size = pick_group(mode, group_size, in_sizes.values(), flag="--mode")
    for name, n in in_sizes.items():
        if group_size and n % group_size:
            raise UserError(f"--group_size {group_size} does not divide the input size {n} of '{name}'; "
                            "choose a group size that does")
    start = time.perf_counter()
    reader = checkpoint.CheckpointReader(files, args)
    stored = reader.shard(0)["norm.weight"].dtype
    target = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else stored
    writer = CheckpointWriter(out, len(files) if shards is None else shards, target, args)  # 0 is refused there

    emb_mode, emb_group = embedding_form(args.dim)

    def tensors():
        for name, t in reader.full_tensors():
            if name == "tok_embeddings.weight":
                q, scale, offset = quantize(t, emb_mode, emb_group)
            elif checkpoint.is_linear(name):
                q, scale, offset = quantize(t, mode, group_size)
            else:
                yield name, t
                continue
            yield name + ".q", q
            yield name + ".scale", scale
            if offset is not None:
                yield name + ".offset", offset

    n = writer.write(tensors(), {**params, "quantization": {"mode": mode, "group_size": group_size, "embeddings":
                                                            {"mode": emb_mode, "group_size": emb_group}}},
                     lambda dest: copy_tokenizer_files(ckpt_dir, dest))
    reader.close()
    log.info("quantized %s into %s (%s, group size %s): %d tensors in %d shard(s) in %.1f s", ckpt_dir, out, mode,
             group_size or "per row", n, writer.n_shards, time.perf_counter() - start)
    return 0
