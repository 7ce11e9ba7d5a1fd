"""Loading checkpoints: any shard count on any world size, and clear errors for broken folders."""

import json

import pytest
import torch

from helpers import PROMPTS, TINY, greedy, make_model_folder, model_args, run_torchrun
from llama_cli import Llama
from llama_cli.checkpoint import ShardPlan
from llama_cli.errors import UserError


def test_two_shards_on_one_process_equal_one_shard(tiny_ckpt, tiny_ckpt2):
    assert greedy(tiny_ckpt[0]) == greedy(tiny_ckpt2[0])


def test_four_shards_on_one_process(tmp_path, spm_path, tiny_ckpt):
    folder, _ = make_model_folder(tmp_path / "four", spm_path, TINY, n_shards=4)
    assert greedy(folder) == greedy(tiny_ckpt[0])


@pytest.mark.parametrize("shards,procs", [(2, 2), (1, 2), (4, 2), (2, 4)])
def test_torchrun_gloo_matches_single_process(tmp_path, spm_path, tiny_ckpt, shards, procs):
    folder, _ = make_model_folder(tmp_path / "ck", spm_path, TINY, n_shards=shards)
    single = greedy(tiny_ckpt[0])
    got = run_torchrun(procs, folder, tmp_path / "out")
    assert got["greedy"] == single
    from llama_cli import native

    # where our CPU kernels build, each process decodes through its layers' two native halves (cpu_step.py)
    assert got["native"] == native.available()


@pytest.mark.parametrize("shards", [2, 1])  # 2: each rank's slices in place from its shard's map; 1: copied
def test_torchrun_keeps_bf16_weights_as_stored(tmp_path, spm_path, shards):
    """A bf16 checkpoint on 2 CPU processes: each keeps its slices of the linear weights in bf16 (where our
    kernels run) and generates what one process does."""
    from llama_cli import native

    folder, _ = make_model_folder(tmp_path / "ck", spm_path, TINY, n_shards=shards, seed=11, dtype=torch.bfloat16)
    got = run_torchrun(2, folder, tmp_path / "out")
    assert got["greedy"] == greedy(folder)
    assert got["linear_dtype"] == ("bfloat16" if native.available() else "float32")


def test_explicit_fp32_that_does_not_fit_says_the_stored_bf16_would(tmp_path, spm_path, monkeypatch):
    from llama_cli import memory, native

    folder, _ = make_model_folder(tmp_path / "ck", spm_path, TINY, seed=13, dtype=torch.bfloat16)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    with pytest.raises(UserError, match="the weights need") as e:
        Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1, dtype="fp32")
    hint = "leave out --dtype fp32 to keep the linear weights in bfloat16 as stored"
    assert (hint in str(e.value)) == native.available()
    with pytest.raises(UserError, match="the weights need") as e:
        Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1)  # the default keeps them already
    assert "leave out" not in str(e.value)


def test_sampling_identical_across_ranks_and_to_single_process(tmp_path, tiny_ckpt2):
    folder = tiny_ckpt2[0]
    got = run_torchrun(2, folder, tmp_path / "out")
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=96, max_batch_size=4)
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    llama.generate(ids, max_gen_len=24, temperature=0)
    assert got["sampled"] == llama.generate(ids, max_gen_len=12, temperature=0.9, top_p=0.9)[0]


def test_heads_that_do_not_divide_are_refused(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"cannot be split over 3 processes.*1, 2, 4"):
        greedy(tiny_ckpt[0])


@pytest.mark.parametrize("shards", [1, 2])  # 2: each shard holds half of the one KV head
def test_more_ranks_than_kv_heads_repeat_heads(tmp_path, spm_path, shards):
    params = {**TINY, "n_kv_heads": 1}
    folder, _ = make_model_folder(tmp_path / "mqa1", spm_path, params, n_shards=1, seed=4)
    folder2, _ = make_model_folder(tmp_path / "mqa2", spm_path, params, n_shards=shards, seed=4)
    assert run_torchrun(2, folder2, tmp_path / "out")["greedy"] == greedy(folder)


@pytest.mark.parametrize("shards,procs", [(2, 2), (4, 2), (4, 4)])
def test_a_repeated_kv_head_is_read_from_every_shard_holding_it(tmp_path, spm_path, shards, procs):
    """One KV head stored split over several shards (as a checkpoint written for more processes than KV heads
    is): every rank gets the whole head, however the shards cut it (each rank used to read only the shards of
    its even share, leaving the rest of the head uninitialized)."""
    from helpers import reader_for

    folder, weights = make_model_folder(tmp_path / "mqa", spm_path, {**TINY, "n_kv_heads": 1}, n_shards=shards)
    reader = reader_for(folder, weights["output.weight"].shape[0])
    for r in range(procs):
        part = reader.rank_state_dict(procs, r, torch.float32)
        for name in ("layers.0.attention.wk.weight", "layers.1.attention.wv.weight"):
            assert torch.equal(part[name], weights[name]), (r, name)
        assert torch.equal(part["layers.0.attention.wq.weight"],
                           weights["layers.0.attention.wq.weight"].chunk(procs)[r])


def test_shard_plan():
    assert ShardPlan(2, 1, 0).needed_shards() == [0, 1]
    assert ShardPlan(4, 2, 1).needed_shards() == [2, 3]
    assert ShardPlan(2, 4, 3).needed_shards() == [1]
    assert ShardPlan(1, 4, 2).needed_shards() == [0]
    assert ShardPlan(2, 4, 1).range(64) == (16, 32)
    assert ShardPlan(2, 1, 0).shards_for(16, 48, 64) == [(0, 16, 16), (1, 0, 16)]


def test_rank_slices_cover_the_whole_weight(tiny_ckpt2):
    from helpers import reader_for

    folder, weights = tiny_ckpt2
    reader = reader_for(folder, weights["output.weight"].shape[0])
    parts = [reader.rank_state_dict(4, r, torch.float32) for r in range(4)]
    assert torch.equal(torch.cat([p["layers.1.attention.wq.weight"] for p in parts], 0),
                       weights["layers.1.attention.wq.weight"])
    assert torch.equal(torch.cat([p["layers.0.feed_forward.w2.weight"] for p in parts], 1),
                       weights["layers.0.feed_forward.w2.weight"])
    assert torch.equal(torch.cat([p["tok_embeddings.weight"] for p in parts], 1), weights["tok_embeddings.weight"])
    # 2 KV heads over 4 ranks: ranks 0,1 hold head 0 and ranks 2,3 head 1
    wk = weights["layers.0.attention.wk.weight"]
    assert torch.equal(parts[1]["layers.0.attention.wk.weight"], wk[:16])
    assert torch.equal(parts[2]["layers.0.attention.wk.weight"], wk[16:])
    assert torch.equal(parts[3]["norm.weight"], weights["norm.weight"])


def test_tied_embeddings_without_output_weight(tmp_path, spm_path):
    folder, weights = make_model_folder(tmp_path / "tied", spm_path, TINY, n_shards=1, seed=5)
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    del sd["output.weight"]
    torch.save(sd, folder / "consolidated.00.pth")
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 32, 1)
    assert torch.equal(llama.model.output.weight, weights["tok_embeddings.weight"])


def test_rope_freqs_key_is_ignored(tmp_path, spm_path, tiny_ckpt):
    folder, _ = make_model_folder(tmp_path / "rf", spm_path, TINY, n_shards=1)
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    sd["rope.freqs"] = torch.ones(8)
    torch.save(sd, folder / "consolidated.00.pth")
    assert greedy(folder) == greedy(tiny_ckpt[0])


def test_unknown_params_keys_warn_once(tmp_path, spm_path, caplog):
    folder, _ = make_model_folder(tmp_path / "unk", spm_path, {**TINY, "some_future_key": 3, "another": "x"})
    with caplog.at_level("WARNING", logger="llama_cli"):
        Llama.build(str(folder), str(folder / "tokenizer.model"), 32, 1)
    warnings = [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert len(warnings) == 1 and "some_future_key" in warnings[0] and "another" in warnings[0]


def test_max_seq_len_past_the_trained_context_warns(tmp_path, spm_path, caplog):
    """A params.json that states the trained context (convert writes it from GGUF and HF files): a longer
    max_seq_len is warned about once, an equal or shorter one is not; and reshard keeps the key."""
    folder, _ = make_model_folder(tmp_path / "ctx", spm_path, {**TINY, "context_length": 48})
    for seq, warned in ((48, False), (32, False), (64, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="llama_cli"):
            Llama.build(str(folder), str(folder / "tokenizer.model"), seq, 1)
        msgs = [r.getMessage() for r in caplog.records if "trained for" in r.getMessage()]
        assert len(msgs) == int(warned), (seq, msgs)
        if warned:
            assert "a context of 64 positions is past the 48 this model was trained for" in msgs[0]
    assert not [r for r in caplog.records if "unknown" in r.getMessage()]
    from llama_cli.cli import cli

    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(tmp_path / "two"), "--shards", "2"]) == 0
    assert json.loads((tmp_path / "two" / "params.json").read_text())["context_length"] == 48


def build_err(folder, tokenizer=None, **kw):
    with pytest.raises(UserError) as e:
        Llama.build(str(folder), str(tokenizer or folder / "tokenizer.model"), 32, 1, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_missing_folder(tmp_path, spm_path):
    assert "does not exist" in build_err(tmp_path / "nope", spm_path)


def test_error_empty_folder(tmp_path, spm_path):
    (tmp_path / "empty").mkdir()
    assert "is empty" in build_err(tmp_path / "empty", spm_path)


def test_error_no_pth(tmp_path, spm_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "params.json").write_text("{}")
    assert "no *.pth" in build_err(tmp_path / "x", spm_path)


@pytest.mark.parametrize("content,match", [
    (None, "has no params.json"), ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
    (json.dumps({**TINY, "dim": "64"}), "'dim' must be int"), (json.dumps({**TINY, "n_layers": 2.5}), "'n_layers'"),
    (json.dumps({**TINY, "use_scaled_rope": "yes"}), "'use_scaled_rope' must be bool"),
    (json.dumps({"dim": 64}), "no 'n_layers'"), (json.dumps({**TINY, "n_heads": 5}), "not a multiple"),
    (json.dumps({**TINY, "context_length": "4k"}), "'context_length' must be int or null"),
    (json.dumps({**TINY, "context_length": 0}), "'context_length' must be a positive integer"),
])
def test_error_bad_params(tmp_path, spm_path, content, match):
    folder, _ = make_model_folder(tmp_path / "p", spm_path, TINY)
    if content is None:
        (folder / "params.json").unlink()
    else:
        (folder / "params.json").write_text(content)
    assert match in build_err(folder)


def test_error_weights_do_not_match_params(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "w", spm_path, TINY)
    (folder / "params.json").write_text(json.dumps({**TINY, "dim": 128}))
    msg = build_err(folder)
    assert "tok_embeddings.weight" in msg and "[320, 64]" in msg and "[320, 128]" in msg


def test_error_more_layers_in_weights_than_params(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "l", spm_path, TINY)
    (folder / "params.json").write_text(json.dumps({**TINY, "n_layers": 1}))
    assert "layers.1." in build_err(folder)


def test_error_fewer_layers_in_weights_than_params(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "l", spm_path, TINY)
    (folder / "params.json").write_text(json.dumps({**TINY, "n_layers": 3}))
    assert "layers.2.attention.wq.weight" in build_err(folder)


def test_error_damaged_shard(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "d", spm_path, TINY)
    (folder / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    assert "damaged" in build_err(folder)


def test_error_pickled_objects_are_refused(tmp_path, spm_path):
    from helpers import NotATensor

    folder, _ = make_model_folder(tmp_path / "pk", spm_path, TINY)
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "evil": NotATensor()}, folder / "consolidated.00.pth")
    msg = build_err(folder)
    assert "refusing" in msg and "NotATensor" in msg


@pytest.mark.parametrize("kind,match", [("missing", "does not exist"), ("dir", "is a folder"), ("empty", "is empty"),
                                        ("garbage", "not a readable tokenizer"), ("json", "tokenizer.json"),
                                        ("tiktoken", "line 2 is not 'base64-token rank'")])
def test_error_bad_tokenizer(tmp_path, tiny_ckpt, kind, match):
    path = tmp_path / "tok"
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not a tokenizer" * 20)
    elif kind == "json":
        path.write_text('{"model": {"type": "BPE"}}')
    elif kind == "tiktoken":
        path.write_text("IQ== 0\nnot-base64!! x\n")
    assert match in build_err(tiny_ckpt[0], path)


def test_error_vocab_size_disagrees_with_tokenizer(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "v", spm_path, TINY)
    (folder / "params.json").write_text(json.dumps({**TINY, "vocab_size": 32000}))
    msg = build_err(folder)
    assert "vocab_size=32000" in msg and "320 tokens" in msg


def test_shards_that_do_not_belong_together(tmp_path, spm_path):
    folder, _ = make_model_folder(tmp_path / "s", spm_path, TINY, n_shards=2)
    sd = torch.load(folder / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:8]
    torch.save(sd, folder / "consolidated.01.pth")
    assert "do not belong together" in build_err(folder)


def test_model_parallel_size_must_match_world(tiny_ckpt):
    assert "model_parallel_size=2" in build_err(tiny_ckpt[0], model_parallel_size=2)


def test_bad_limits(tiny_ckpt):
    folder = tiny_ckpt[0]
    with pytest.raises(UserError, match="max_seq_len"):
        Llama.build(str(folder), str(folder / "tokenizer.model"), 0, 1)
    with pytest.raises(UserError, match="max_batch_size"):
        Llama.build(str(folder), str(folder / "tokenizer.model"), 16, -2)


def test_kv_cache_that_does_not_fit_is_refused_before_allocation(tiny_ckpt):
    folder = tiny_ckpt[0]
    with pytest.raises(UserError, match=r"KV cache needs .* GiB.*max_batch_size"):
        Llama.build(str(folder), str(folder / "tokenizer.model"), 1_000_000, 100_000)


def test_device_not_available(tiny_ckpt):
    folder = tiny_ckpt[0]
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    assert "not available" in build_err(folder, device="cuda")
    assert "unknown device" in build_err(folder, device="gpu0")
    assert "unknown dtype" in build_err(folder, dtype="fp8")


def test_weights_that_do_not_fit_are_refused_with_numbers():
    from llama_cli.memory import preflight

    args = model_args({"dim": 4096, "n_layers": 32, "n_heads": 32}, 32000)
    with pytest.raises(UserError, match=r"weights need 12\.\d\d GiB per process but only 8\.00 GiB.*--quantize int8"):
        preflight(args, 1, torch.device("cpu"), torch.bfloat16, 1, 64, free=8 * 1024 ** 3)
    preflight(args, 2, torch.device("cpu"), torch.bfloat16, 1, 64, free=8 * 1024 ** 3)  # half fits
    # fp32 activations with the linear weights kept in bf16 as stored (the CPU's default): the embeddings in fp32
    with pytest.raises(UserError, match=r"weights need 25\.\d\d GiB per process but only 14\.00 GiB"):
        preflight(args, 1, torch.device("cpu"), torch.float32, 1, 64, free=14 * 1024 ** 3)
    preflight(args, 1, torch.device("cpu"), torch.float32, 1, 64, free=14 * 1024 ** 3, linear_dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"25\.\d\d GiB .*; leave out --dtype fp32 to keep the linear weights in "
                                        r"bfloat16 as stored \(12\.\d\d GiB\), or load them quantized"):
        preflight(args, 1, torch.device("cpu"), torch.float32, 1, 64, free=14 * 1024 ** 3, stored_half=torch.bfloat16)
    from llama_cli.memory import weight_bytes

    embeddings = 32000 * 4096
    assert (weight_bytes(args, 1, torch.float32, torch.bfloat16) - embeddings * 4
            == weight_bytes(args, 1, torch.bfloat16) - embeddings * 2 + 2 * 4096 * 65)  # norms (2 a layer + 1) fp32
    with pytest.raises(UserError, match=r"KV cache needs 8\.00 GiB .*6\.28 GiB of weights.*--max_batch_size 30\)"):
        preflight(args, 2, torch.device("cpu"), torch.bfloat16, 32, 1024, free=14 * 1024 ** 3)
    # fp32 activations: a cache of fp32 (16 GiB here), or of bf16 with --kv_cache_dtype bf16 (8 GiB), which
    # the refusal of an fp32 one suggests
    with pytest.raises(UserError, match=r"KV cache needs 16\.00 GiB .*\), or hold it in half the bytes "
                                        r"\(--kv_cache_dtype bf16\)$"):
        preflight(args, 2, torch.device("cpu"), torch.float32, 32, 1024, free=14 * 1024 ** 3,
                  linear_dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"KV cache needs 8\.00 GiB .*--max_batch_size \d+\)$"):
        preflight(args, 2, torch.device("cpu"), torch.float32, 32, 1024, free=12 * 1024 ** 3,
                  linear_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    # one row (one prompt, or chat, which has no --max_batch_size): only its length is named
    with pytest.raises(UserError, match=r"KV cache needs 64\.00 GiB \(one row of max_seq_len=131072\) on top of "
                                        r"12\.\d\d GiB .*; lower --max_seq_len \(e\.g\. --max_seq_len 7062\)$"):
        preflight(args, 1, torch.device("cpu"), torch.bfloat16, 1, 131072, free=16 * 1024 ** 3)
