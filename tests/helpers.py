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


def model_args(params: dict, vocab_size: int):
    from llama_cli.checkpoint import args_from_params

    return args_from_params({**params, "vocab_size": vocab_size})[0]


def random_weights(params: dict, vocab_size: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full (unsharded) random weights in Meta's naming (checkpoint.weight_table), scaled so logits are
    far from uniform."""
    from llama_cli.checkpoint import weight_table

    a = model_args(params, vocab_size)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (shape, _) in weight_table(a).items():
        if len(shape) == 1:  # norms
            sd[name] = (1 + 0.1 * torch.randn(*shape, generator=g)).to(dtype)
        else:
            scale = {"tok_embeddings.weight": 1.0, "output.weight": 2 * a.dim ** -0.5}.get(name, shape[-1] ** -0.5)
            sd[name] = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return sd


def meta_split_dim(name: str):
    from llama_cli.checkpoint import split_dim

    return split_dim(name)


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


def to_hf(params: dict, weights: dict, vocab_size: int, max_positions: int = 512, device=None, dtype=torch.float32):
    """Meta-layout weights -> transformers LlamaForCausalLM, undoing the rotary layout difference. Built
    directly on `device` in `dtype` (fp32 on the CPU by default; scripts/gpu_check.py builds a 7B in bf16
    on the GPU, where building on the CPU in fp32 would take minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model_args(params, vocab_size)
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if (a.rope_scaling or {}).get("rope_type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": a.rope_theta, "factor": a.rope_scaling["factor"]}
    elif a.use_scaled_rope:
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
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=False)
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


# --- shared by several test files ---------------------------------------------------------------------

PROMPTS = ["Hello world", "The cat sleeps under the tree because", "42"]
TIE = 1e-3  # relative to the logit scale: closer than this, either token is a right answer


def greedy(folder, **kw):
    """Greedy tokens of PROMPTS through Llama.build/generate on a checkpoint folder."""
    from llama_cli import Llama

    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=96, max_batch_size=4, **kw)
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    return llama.generate(ids, max_gen_len=24, temperature=0)[0]


def run_torchrun(n_procs, folder, out, env=None):
    """tests/gen_worker.py under torchrun (gloo); checks every rank agrees and returns rank 0's results."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
           str(REPO / "tests" / "gen_worker.py"), str(folder), str(folder / "tokenizer.model"), str(out)]
    proc = subprocess.run(cmd, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(n_procs)]
    assert all(r["world"] == n_procs for r in results)
    assert all(r == results[0] for r in results), "ranks disagree"
    return results[0]


def near_tie_gap(logits: torch.Tensor, a: int, b: int) -> float:
    """How far apart two tokens' logits are, relative to the logit scale."""
    return abs(logits[a] - logits[b]).item() / logits.abs().max().item()


def assert_same_or_near_tie(llama, ids, got, want, tol: float = TIE):
    """got == want, or they part at a step where the two tokens' logits (from `llama`'s own model, run on
    the prompt and `want`'s tokens before that step) are a near-tie."""
    eos = llama.tokenizer.eos_id  # a shorter output stopped there: compare as if EOS was chosen
    got, want = got + [eos], want + [eos]
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        assert len(got) == len(want), (got, want)  # both stopped by max_gen_len, or both by EOS
        return
    logits = llama.model(torch.tensor([ids + want[:k]]))[0, -1]
    gap = near_tie_gap(logits, got[k], want[k])
    assert gap <= tol, f"step {k}: {got[k]} vs {want[k]} differ by {gap:.3g} of the logit scale: wrong token"


def assert_greedy_matches(ours: list[int], ref_logits: torch.Tensor, start: int, tol: float = 1e-3):
    """Each generated token must be the reference's argmax at that position (ref_logits: (seq, vocab) of
    an independent implementation), unless its top two logits there are a near-tie."""
    ties = 0
    for i, tok in enumerate(ours):
        row = ref_logits[start + i - 1]
        best = int(row.argmax())
        if tok == best:
            continue
        gap = near_tie_gap(row, best, tok)
        assert gap <= tol, f"step {i}: generated token {tok} but the reference prefers {best} by {gap:.3g}: wrong token"
        ties += 1
    assert ties <= len(ours) // 4, f"{ties} near-ties in {len(ours)} steps: the test model is too degenerate"


def requests(prompts, **settings):
    """PromptRequests with the given settings (max_gen_len=..., or per prompt: a list of dicts)."""
    from llama_cli.prompts import PromptRequest
    from llama_cli.settings import Settings, resolve

    base = resolve(Settings(), {k: v for k, v in settings.items() if not isinstance(v, list)})
    out = []
    for i, p in enumerate(prompts):
        own = {k: v[i] for k, v in settings.items() if isinstance(v, list)}
        out.append(PromptRequest(i, p, resolve(base, own, "test")))
    return out


def spy_cache_rows(monkeypatch) -> list:
    """Patch Llama.build to record the KV cache rows of every model built (the first layer's cache_k
    batch size); returns the list it appends to."""
    from llama_cli.generation import Llama

    rows, real = [], Llama.build

    def build(*a, **kw):
        llama = real(*a, **kw)
        rows.append(llama.model.layers[0].attention.cache_k.shape[0])
        return llama

    monkeypatch.setattr(Llama, "build", staticmethod(build))
    return rows


# what a launch may pass besides the kernel's own arguments: the compiler's options
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def record_launches(monkeypatch, module, names) -> list:
    """Replace the Triton kernels `names` of `module` by recorders of what their wrappers pass, (kernel, args,
    keyword arguments, compiler options) a launch, instead of launching: what the compile-for-a-GPU tests hand to
    Triton's compiler."""
    calls = []

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                options = {k: kw.pop(k) for k in LAUNCH_OPTIONS if k in kw}
                calls.append((self.kernel, args, kw, options))
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Launch(getattr(module, name)))
    return calls
