"""Write a small random Meta-layout checkpoint (consolidated.NN.pth, params.json, tokenizer.model).

For trying the tool and benchmarking shapes without real weights: its text is gibberish.
    python scripts/make_random_checkpoint.py --out checkpoints/random-tiny [--shards 2]
        [--dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 4] [--tokenizer path/to/tokenizer.model]
"""

import argparse
import io
import json
import random
import sys
from pathlib import Path

import torch


def train_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the of and to in is was it for on with as his he at by this had from are but not they "
             "one all were we when there can an your which their said if do will each about how up out "
             "them then she many some so these would other into has more her two like him see time could "
             "no make than first been its who now people my made over did down only way find use may "
             "water long little very after words called just where most know").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(4000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=512,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=4)
    ap.add_argument("--vocab_size", type=int, default=None, help="default: the tokenizer's")
    ap.add_argument("--multiple_of", type=int, default=64)
    ap.add_argument("--ffn_dim_multiplier", type=float, default=None)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--tokenizer", default=None, help="copy this tokenizer.model instead of training a tiny one")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llama_cli.checkpoint import args_from_params, weight_table
    from llama_cli.devices import DTYPES

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.tokenizer:
        (out / "tokenizer.model").write_bytes(Path(a.tokenizer).read_bytes())
    else:
        train_tokenizer(out / "tokenizer.model")
    import sentencepiece as spm

    vocab = a.vocab_size or spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": -1 if a.vocab_size is None else vocab, "multiple_of": a.multiple_of,
              "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": 1e-5, "rope_theta": 10000.0}
    args, _ = args_from_params({**params, "vocab_size": vocab})
    dtype = DTYPES[a.dtype]
    g = torch.Generator().manual_seed(a.seed)
    shapes = weight_table(args)  # name -> (shape, the dimension Meta's shards split it along)
    shards = [{} for _ in range(a.shards)]
    for name, (shape, dim) in shapes.items():  # one tensor at a time keeps peak memory low
        t = torch.ones(shape) if dim is None else torch.randn(shape, generator=g) * shape[-1] ** -0.5
        t = t.to(dtype)
        for s in range(a.shards):
            shards[s][name] = t.clone() if dim is None else t.chunk(a.shards, dim)[s].clone()
    for s, sd in enumerate(shards):
        torch.save(sd, out / f"consolidated.{s:02d}.pth")
    (out / "params.json").write_text(json.dumps(params, indent=2))
    print(f"wrote {out} ({a.shards} shard(s), {sum(t.numel() for t in shards[0].values()) * a.shards / 1e6:.1f}M "
          f"parameters, {a.dtype}); random weights: the text will be gibberish", file=sys.stderr)


if __name__ == "__main__":
    main()
