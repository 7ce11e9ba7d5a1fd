"""GGUF (llama.cpp) file of architecture `llama` -> Meta layout.

Weights are dequantized with the `gguf` package, one tensor at a time. llama.cpp already
stores wq/wk in Meta's interleaved rotary layout, so no permutation is needed. The
tokenizer is rebuilt from the GGUF vocabulary: SentencePiece-style `llama` vocabularies
become a SentencePiece tokenizer.model, byte-level BPE `gpt2` vocabularies a HuggingFace
tokenizer.json with a tokenizer_config.json carrying BOS/EOS and add_bos_token.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..checkpoint import args_from_params
from ..model import ModelArgs, ffn_hidden_dim
from ..tokenizer import LLAMA3_PATTERN

log = logging.getLogger("llama_cli")

LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
FIXED_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
               "output.weight": "output.weight"}


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError and struct errors on damaged files
        raise UserError(f"cannot read GGUF file {path} ({e}); the file is damaged or not GGUF") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def params_from_gguf(reader, path: str) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path} is a GGUF of architecture '{arch}'; only 'llama' converts")
    try:
        dim = int(field(reader, "llama.embedding_length"))
        params = {"dim": dim, "n_layers": int(field(reader, "llama.block_count")),
                  "n_heads": int(field(reader, "llama.attention.head_count")),
                  "n_kv_heads": int(field(reader, "llama.attention.head_count_kv",
                                          field(reader, "llama.attention.head_count"))),
                  "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
                  "multiple_of": 256,
                  "norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                  "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0))}
        hidden = int(field(reader, "llama.feed_forward_length"))
    except (TypeError, KeyError) as e:
        raise UserError(f"{path} lacks model metadata ({e}); not a complete llama GGUF") from None
    if ffn_hidden_dim(dim, 256, None) != hidden:
        params["ffn_hidden_dim"] = hidden
    _check_shape_keys(reader, path, dim // params["n_heads"])
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        params["use_scaled_rope"] = True  # llama.cpp keeps Llama 3.1's rope scaling as a tensor
    kind = field(reader, "llama.rope.scaling.type", "none")
    factor = field(reader, "llama.rope.scaling.factor", field(reader, "llama.rope.scale_linear", 1.0))
    if kind == "linear" or (kind == "none" and factor not in (None, 0, 1)):  # older files: scale_linear only
        params["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif kind != "none":
        raise UserError(f"{path} uses rope scaling '{kind}', which llama-cli does not support (linear and "
                        "Llama 3.1's are)")
    context = field(reader, "llama.context_length", None)
    if context:
        params["context_length"] = int(context)
    return params


def _check_shape_keys(reader, path: str, head_dim: int) -> None:
    """Refuse, by name, the llama-architecture variants whose metadata changes the model in ways LLaMA's
    does not have (they would otherwise convert into a different model): experts, head sizes other than
    dim/n_heads, rotary over part of each head."""
    experts = field(reader, "llama.expert_count", 0)
    if experts:
        raise UserError(f"{path} is a mixture of {int(experts)} experts (Mixtral-style); only dense llama models "
                        "convert")
    for key in ("llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"):
        value = field(reader, key, head_dim)
        if int(value) != head_dim:
            raise UserError(f"{path} has {key} = {int(value)}, not the head size {head_dim} (embedding_length / "
                            "head_count) that LLaMA models have; such models are not supported")


def meta_name(name: str) -> str | None:
    if name in FIXED_NAMES:
        return FIXED_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    if name == "rope_freqs.weight":
        return None
    raise UserError(f"unexpected tensor '{name}' in the GGUF file; not a plain llama model")


def dequantize(t) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's (rows, cols) order."""
    from gguf import GGMLQuantizationType, quants

    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(f"tensor '{t.name}' is stored as {t.tensor_type.name}, which the gguf package cannot "
                        "dequantize; convert from a file with another quantization") from None
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
    if t.tensor_type == GGMLQuantizationType.F32 and data.dtype != np.float32:
        data = data.astype(np.float32)
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
    return torch.from_numpy(data if data.flags.writeable else data.copy())


def check_rope_freqs(reader, args: ModelArgs) -> None:
    """A rope_freqs tensor must be what Llama 3.1's scaling gives, which is what we compute."""
    from ..model import rope_frequencies

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return
    factors = dequantize(t).flatten()
    plain = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    ours = plain.float() / rope_frequencies(args)
    if factors.shape != ours.shape or not torch.allclose(factors, ours, rtol=1e-3):
        raise UserError("the GGUF's rope_freqs differ from Llama 3.1's rope scaling; this rope scaling is not "
                        "supported")


# GGUF types whose values our forms hold exactly (quant.py): Q8_0 = int8, groups of 32, fp16 scales;
# Q4_0 / Q4_1 = int4, groups of 32 (Q4_0: offset = -8 scale; Q4_1: its min). The K-quants (super-blocks
# with 6-bit scales of scales) have no exact equivalent here: they are dequantized.
EXACT = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}


def pick_form(reader) -> str | None:
    """The quantized form the file's linear layers are kept in: the commoner of int8 (Q8_0) and int4
    (Q4_0/Q4_1) among them; None when no linear layer is in one of those types."""
    from collections import Counter

    from ..checkpoint import is_linear

    counts = Counter(EXACT[t.tensor_type.name] for t in reader.tensors
                     if t.tensor_type.name in EXACT and is_linear(meta_name(t.name) or ""))
    return counts.most_common(1)[0][0] if counts else None


def blocks_as_form(t) -> dict[str, torch.Tensor]:
    """A Q8_0 / Q4_0 / Q4_1 tensor as our parts {".q", ".scale"(, ".offset")}, values unchanged."""
    kind = t.tensor_type.name
    rows = int(t.shape[1]) if len(t.shape) > 1 else 1
    cols = int(t.shape[0])
    per = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    raw = np.ascontiguousarray(t.data, dtype=np.uint8).reshape(rows, cols // 32, per)
    d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0])  # (rows, groups)
    if kind == "Q8_0":
        q = torch.from_numpy(raw[..., 2:].copy().view(np.int8)).reshape(rows, cols)
        return {".q": q, ".scale": d}
    qs = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]  # byte j: element j low, element j + 16 high
    q = torch.from_numpy(qs.copy()).reshape(rows, cols // 2)  # our int4 layout is GGUF's: copied as it is
    if kind == "Q4_1":
        return {".q": q, ".scale": d, ".offset": torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0])}
    return {".q": q, ".scale": d, ".offset": -8 * d.float()}


def read(path: str, dequantize_all: bool = False) -> tuple[dict, ModelArgs, torch.dtype, Iterator]:
    """(params, args, fp32, (Meta name, tensor) one at a time) of a llama GGUF file. Linear layers in
    Q8_0, Q4_0 or Q4_1 stay quantized (our int8/int4 forms, exactly the file's values) unless
    dequantize_all, and so do the token embeddings then (in their own form: llama.cpp's 4-bit files
    keep them in Q8_0); everything else is dequantized to fp32."""
    from ..checkpoint import is_linear

    reader = open_gguf(path)
    params = params_from_gguf(reader, path)
    form = None if dequantize_all else pick_form(reader)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    embd_form = EXACT.get(embd.tensor_type.name) if form is not None and embd is not None else None
    if form is not None:
        params["quantization"] = {"mode": form, "group_size": 32}
        if embd_form is not None:  # kept as it is too (a tied output layer reads it in this form)
            params["quantization"]["embeddings"] = {"mode": embd_form, "group_size": 32}
    args, _ = args_from_params(params)
    check_rope_freqs(reader, args)

    def converted():
        for t in reader.tensors:
            name = meta_name(t.name)
            if name is None:
                continue
            if (form is not None and is_linear(name) and EXACT.get(t.tensor_type.name) == form
                    or embd_form is not None and name == "tok_embeddings.weight"):
                for part, tensor in blocks_as_form(t).items():
                    yield name + part, tensor
            else:
                yield name, dequantize(t)

    return params, args, torch.float32, converted()


def write_tokenizer(path: str, out: str) -> list[str]:
    """Rebuild the GGUF's tokenizer in `out`; returns the files written."""
    reader = open_gguf(path)
    model = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path} carries no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    template = field(reader, "tokenizer.chat_template")  # the model's own chat format, carried over
    if model == "llama":
        scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        _write_sentencepiece(os.path.join(out, "tokenizer.model"), tokens, scores, types, bos, eos,
                             field(reader, "tokenizer.ggml.unknown_token_id", 0),
                             field(reader, "tokenizer.ggml.add_space_prefix", True))
        config = {"add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", True))}
        config.update(_special_tokens(tokens, bos, eos))
        if template:
            config["chat_template"] = template
        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        return ["tokenizer.model", "tokenizer_config.json"]
    if model == "gpt2":
        merges = field(reader, "tokenizer.ggml.merges") or []
        _write_hf_bpe(out, tokens, merges, types, bos, eos, field(reader, "tokenizer.ggml.add_bos_token", False),
                      field(reader, "tokenizer.ggml.pre", "default"), template)
        return ["tokenizer.json", "tokenizer_config.json"]
    raise UserError(f"{path} has a '{model}' tokenizer; only 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) "
                    "vocabularies convert")


def _write_sentencepiece(path, tokens, scores, types, bos, eos, unk, add_space_prefix) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = any(t == 6 for t in types)
    m.trainer_spec.unk_id = unk if unk is not None else 0
    m.trainer_spec.bos_id = bos if bos is not None else -1
    m.trainer_spec.eos_id = eos if eos is not None else -1
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(add_space_prefix)
    m.normalizer_spec.remove_extra_whitespaces = False
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for tok, score, kind in zip(tokens, scores, types):
        piece = m.pieces.add()
        piece.piece, piece.score = tok, float(score)
        piece.type = kinds.get(int(kind), pb.ModelProto.SentencePiece.NORMAL)
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


def _special_tokens(tokens, bos, eos) -> dict:
    out = {}
    if bos is not None and 0 <= bos < len(tokens):
        out["bos_token"] = tokens[bos]
    if eos is not None and 0 <= eos < len(tokens):
        out["eos_token"] = tokens[eos]
    return out


def _write_hf_bpe(out, tokens, merges, types, bos, eos, add_bos, pre, template=None) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "llama-bpe":  # Llama 3's split pattern, then bytes
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # digits one by one, then GPT-2's pattern
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in ("default", "gpt2", None):
            log.warning("GGUF pre-tokenizer '%s' is not known here; using GPT-2's byte-level pattern", pre)
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                           for tok, kind in zip(tokens, types) if int(kind) in (3, 4)])
    tk.save(os.path.join(out, "tokenizer.json"))
    config = {"add_bos_token": bool(add_bos), "tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(_special_tokens(tokens, bos, eos))
    if template:
        config["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
