"""Test helpers: tiny SentencePiece tokenizers, tiny random Meta-layout checkpoints, and the
conversion of those weights to HuggingFace's LlamaForCausalLM (the independent reference)."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer.model"

WORDS = ("the a an one two three red green blue cat dog bird fish tree house river mountain sun moon star "
         "runs jumps sleeps eats sings reads writes quickly slowly happily under over near far today "
         "tomorrow yesterday and but or because when while if then hello world model token text prompt "
         "answer question number 42 7 1999 café naïve über").split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + rng.choice(".!?")
            for _ in range(n)]


def train_sentencepiece(path: Path, vocab_size: int = 320) -> Path:
    """A tiny BPE SentencePiece model set up like Llama's: special ids unk 0, bos 1, eos 2, byte
    fallback, identity normalization keeping whitespace as it is."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True,
    )
    path.write_bytes(buf.getvalue())
    return path


TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
        "norm_eps": 1e-5, "rope_theta": 10000.0}


def random_weights(params: dict, vocab_size: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full (unsharded) random weights in Meta's naming, scaled so logits are far from uniform."""
    from llama_cli.model import ModelArgs

    a, _ = ModelArgs.from_params({**params, "vocab_size": vocab_size})
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hd = a.head_dim
    sd = {"tok_embeddings.weight": w(vocab_size, a.dim, scale=1.0), "norm.weight": 1 + 0.1 * w(a.dim, scale=1.0),
          "output.weight": w(vocab_size, a.dim, scale=2 * a.dim ** -0.5)}
    for i in range(a.n_layers):
        p = f"layers.{i}."
        sd.update({
            p + "attention.wq.weight": w(a.n_heads * hd, a.dim), p + "attention.wk.weight": w(a.n_kv_heads * hd, a.dim),
            p + "attention.wv.weight": w(a.n_kv_heads * hd, a.dim), p + "attention.wo.weight": w(a.dim, a.n_heads * hd),
            p + "feed_forward.w1.weight": w(a.hidden_dim, a.dim), p + "feed_forward.w3.weight": w(a.hidden_dim, a.dim),
            p + "feed_forward.w2.weight": w(a.dim, a.hidden_dim),
            p + "attention_norm.weight": 1 + 0.1 * w(a.dim, scale=1.0), p + "ffn_norm.weight": 1 + 0.1 * w(a.dim, scale=1.0),
        })
    return sd


MERGE_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_split_dim(name: str):
    key = name.split(".")[-2]
    return MERGE_DIM.get(key)


def write_checkpoint(folder: Path, params: dict, weights: dict, n_shards: int = 1) -> Path:
    """Write weights as Meta does: consolidated.NN.pth split the fairscale way, plus params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        shard = {}
        for name, t in weights.items():
            d = meta_split_dim(name)
            shard[name] = t.clone() if d is None else t.chunk(n_shards, dim=d)[s].clone()
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def to_hf(params: dict, weights: dict, vocab_size: int, max_positions: int = 512):
    """Meta-layout weights -> transformers LlamaForCausalLM (fp32), undoing the rotary layout difference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_cli.model import ModelArgs

    a, _ = ModelArgs.from_params({**params, "vocab_size": vocab_size})
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      rms_norm_eps=a.norm_eps, max_position_embeddings=max_positions, rope_parameters=rope,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)

    def permute(w, n_heads):  # Meta's interleaved pairs -> HF's rotate-half halves
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"],
          "lm_head.weight": weights["output.weight"]}
    for i in range(a.n_layers):
        m, p = f"model.layers.{i}.", f"layers.{i}."
        hf.update({
            m + "self_attn.q_proj.weight": permute(weights[p + "attention.wq.weight"], a.n_heads),
            m + "self_attn.k_proj.weight": permute(weights[p + "attention.wk.weight"], a.n_kv_heads),
            m + "self_attn.v_proj.weight": weights[p + "attention.wv.weight"],
            m + "self_attn.o_proj.weight": weights[p + "attention.wo.weight"],
            m + "mlp.gate_proj.weight": weights[p + "feed_forward.w1.weight"],
            m + "mlp.up_proj.weight": weights[p + "feed_forward.w3.weight"],
            m + "mlp.down_proj.weight": weights[p + "feed_forward.w2.weight"],
            m + "input_layernorm.weight": weights[p + "attention_norm.weight"],
            m + "post_attention_layernorm.weight": weights[p + "ffn_norm.weight"],
        })
    model = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise AssertionError(f"HF conversion: missing {missing}, unexpected {unexpected}")
    return model


def make_model_folder(root: Path, tokenizer: Path, params: dict | None = None, n_shards: int = 1,
                      seed: int = 0, dtype=torch.float32) -> tuple[Path, dict]:
    """A checkpoint folder with a copy of the tokenizer; returns (folder, full weights)."""
    import sentencepiece as spm

    params = dict(params or TINY)
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    weights = random_weights(params, vocab, seed=seed, dtype=dtype)
    folder = write_checkpoint(root, params, weights, n_shards)
    (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return folder, weights


def reader_for(folder: Path, vocab_size: int):
    """A CheckpointReader for a test checkpoint folder (its params say vocab_size -1)."""
    from llama_cli.checkpoint import CheckpointReader, find_checkpoint, load_args

    files, params = find_checkpoint(folder)
    args = load_args(params)
    args.vocab_size = vocab_size
    return CheckpointReader(files, args)


class NotATensor:
    """Pickled into a checkpoint by a test: loading must refuse it, not run it."""

    def __reduce__(self):
        return (NotATensor, ())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
