"""HuggingFace Llama folder (config.json, *.safetensors or *.bin, tokenizer files) -> Meta layout.

HF stores wq/wk with each head's rotary pairs split into two halves ("rotate half"); Meta
interleaves them. Converting undoes HF's permutation. Tensors are read one at a time from
memory-mapped files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator

import torch

from ..checkpoint import open_shard
from ..errors import UserError
from ..checkpoint import args_from_params
from ..model import ModelArgs, ffn_hidden_dim

log = logging.getLogger("llama_cli")


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> Meta's interleaved pairs, per head. w: (n_heads * head_dim, dim)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError:
        if os.path.isfile(os.path.join(src, "params.json")):  # ours already: nothing to convert
            raise UserError(f"{src} is a Meta checkpoint folder (params.json) already, nothing to convert: run it "
                            "with --ckpt_dir, or rewrite it with llama-cli reshard (shards, --dtype) or llama-cli "
                            "quantize") from None
        raise UserError(f"{src} has no config.json; a HuggingFace model folder holds config.json and "
                        "*.safetensors") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    arch = cfg.get("model_type")
    if arch != "llama":
        raise UserError(f"{src} holds a '{arch}' model (config.json model_type); only 'llama' models convert")
    return cfg


def params_from_config(cfg: dict) -> dict:
    """config.json -> params.json keys."""
    try:
        dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        params = {"dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": heads,
                  "n_kv_heads": cfg.get("num_key_value_heads") or heads, "vocab_size": cfg["vocab_size"],
                  "multiple_of": 256, "norm_eps": cfg.get("rms_norm_eps", 1e-5)}
        hidden = cfg["intermediate_size"]
    except KeyError as e:
        raise UserError(f"config.json lacks {e}; it is not a complete Llama config") from None
    if cfg.get("head_dim") not in (None, dim // heads):
        raise UserError(f"config.json head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads; "
                        "such models are not supported")
    if ffn_hidden_dim(dim, 256, None) != hidden:
        params["ffn_hidden_dim"] = hidden
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5
    scaling = cfg.get("rope_scaling") or rope
    params["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        params["use_scaled_rope"] = True
        params["rope_scaling"] = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                          "original_max_position_embeddings") if k in scaling}
    elif kind == "linear":
        params["rope_scaling"] = {"rope_type": "linear", "factor": float(scaling["factor"])}
    elif kind not in ("default", None):
        raise UserError(f"config.json rope scaling of type '{kind}' is not supported (llama3 and linear are)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("config.json asks for attention or MLP biases, which LLaMA checkpoints do not have")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json's hidden_act is {cfg['hidden_act']!r}; LLaMA's feed-forward uses silu, so this "
                        "model would run as another one")
    if isinstance(cfg.get("max_position_embeddings"), int) and cfg["max_position_embeddings"] > 0:
        params["context_length"] = cfg["max_position_embeddings"]
    return params


def weight_files(src: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
    if not files:
        raise UserError(f"{src} has no *.safetensors or pytorch_model*.bin weights")
    return files


def tensors(src: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) one at a time, memory-mapped."""
    for path in weight_files(src):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            sd = open_shard(path)
            for name in list(sd):
                yield name, sd.pop(name)


def meta_name(hf: str) -> str | None:
    """HF tensor name -> Meta name (None for tensors Meta's layout does not keep)."""
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"]:
        sub = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
               "mlp.up_proj": "feed_forward.w3"}.get(".".join(parts[3:5]))
        if sub and parts[5] == "weight":
            return f"layers.{parts[2]}.{sub}.weight"
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[4] == "weight":
        norm = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}.get(parts[3])
        if norm:
            return f"layers.{parts[2]}.{norm}.weight"
    if "rotary_emb" in hf:
        return None
    raise UserError(f"unexpected tensor '{hf}' in the HF weights; not a plain Llama model")


def read(src: str) -> tuple[dict, ModelArgs, torch.dtype, Iterator[tuple[str, torch.Tensor]]]:
    """(params, args, stored dtype, (Meta name, tensor) one at a time) of a HF Llama folder."""
    cfg = read_config(src)
    params = params_from_config(cfg)
    args, _ = args_from_params(params)
    tied = bool(cfg.get("tie_word_embeddings", False))
    stored = next(tensors(src))[1].dtype

    def converted():
        for name, t in tensors(src):
            meta = meta_name(name)
            if meta is None or (tied and meta == "output.weight"):
                continue
            if meta.endswith("attention.wq.weight"):
                t = unpermute(t, args.n_heads)
            elif meta.endswith("attention.wk.weight"):
                t = unpermute(t, args.n_kv_heads)
            yield meta, t

    return params, args, stored, converted()


def write_tokenizer(src: str, out: str) -> list[str]:
    from .writer import copy_tokenizer_files

    copied = copy_tokenizer_files(src, out)
    if not any(n in copied for n in ("tokenizer.model", "tokenizer.json")):
        raise UserError(f"{src} has neither tokenizer.model nor tokenizer.json to go with the weights")
    return copied
