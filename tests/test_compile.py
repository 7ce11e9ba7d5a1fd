"""Compiled decoding gives the same tokens as eager decoding (CPU; scripts/gpu_check.py checks CUDA),
and --compile auto follows the measurements and the persistent compile cache."""

import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, assert_same_or_near_tie, greedy, requests, run_torchrun, subprocess_env
from llama_cli import Llama


def test_compiled_greedy_equals_eager(tiny_ckpt):
    folder = tiny_ckpt[0]
    tok = str(folder / "tokenizer.model")
    eager = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="off")
    compiled = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="on")
    assert compiled.compiled and not eager.compiled
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello world", "The cat sleeps under")]
    a, _ = eager.generate(prompts, max_gen_len=24, temperature=0)
    b, _ = compiled.generate(prompts, max_gen_len=24, temperature=0)
    for ids, x, y in zip(prompts, b, a):
        assert_same_or_near_tie(eager, ids, x, y)
    # batch of one uses the fused multiply-and-sum matrix-vector path
    c, _ = compiled.generate(prompts[:1], max_gen_len=24, temperature=0)
    assert_same_or_near_tie(eager, prompts[0], c[0], a[0])
    assert compiled.engine.warmup_s > 0  # compile time is counted apart from generation


def test_compiled_continuous_batching_equals_eager(tiny_ckpt):
    from llama_cli.scheduler import Options, run_continuous

    folder = tiny_ckpt[0]
    tok = str(folder / "tokenizer.model")
    eager = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="off")
    compiled = Llama.build(str(folder), tok, max_seq_len=64, max_batch_size=2, compile="on")
    reqs = requests(["Hello", "The cat", "42", "Red green blue", "a", "Why"], temperature=0,
                    max_gen_len=[20, 3, 9, 30, 1, 12])
    a, b = {}, {}
    run_continuous(eager, reqs, Options(), lambda r: a.__setitem__(r.request.index, r.tokens))
    run_continuous(compiled, reqs, Options(), lambda r: b.__setitem__(r.request.index, r.tokens))
    for r in reqs:
        ids = eager.tokenizer.encode(r.prompt, bos=True, eos=False)
        assert_same_or_near_tie(eager, ids, b[r.index], a[r.index])


def test_compiled_model_parallel_under_torchrun(tmp_path, tiny_ckpt2, tiny_ckpt):
    # batch 1: on the CPU the compiled step serves 1-2 rows (larger batches stay eager there)
    got = run_torchrun(2, tiny_ckpt2[0], tmp_path / "out", env={"GEN_COMPILE": "on", "GEN_BATCH": "1"})
    assert got["greedy"] == greedy(tiny_ckpt[0])


def test_compile_auto_follows_the_measurements(tmp_path, monkeypatch):
    from llama_cli.engine import decide_compile

    monkeypatch.setenv("LLAMA_CLI_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=10_000) is True
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=100) is False  # compiling would cost more
    assert decide_compile("auto", cpu, 16, key="k", expected_tokens=10_000) is False  # eager is faster at 16
    assert decide_compile("on", cpu, 16) is True and decide_compile("off", cpu, 1, "k", 10_000) is False
    from llama_cli import compiled

    compiled.mark_warm("k")  # compiled before (e.g. by llama-cli compile): a job of 128+ tokens uses it
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=200) is True
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=32) is False  # loading it would cost more
    # quantized weights: eager dequantizes every weight per step, so compiling repays much sooner
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=32, quantized=True) is True
    assert decide_compile("auto", cpu, 1, key="other", expected_tokens=100, quantized=True) is False
    assert decide_compile("auto", cpu, 1, key="other", expected_tokens=200, quantized=True) is True
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=8, quantized=True) is False
    # quantized weights on our CPU kernels: eager is fast too, so compiling repays only for long jobs
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=200, kernels=True) is False
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=600, kernels=True) is True  # kept
    assert decide_compile("auto", cpu, 1, key="other", expected_tokens=2000, kernels=True) is False
    assert decide_compile("auto", cpu, 1, key="other", expected_tokens=5000, kernels=True) is True
    # every layer in one native call (cpu_step.py): faster than compiled, so auto never compiles; on is on
    assert decide_compile("auto", cpu, 1, key="k", expected_tokens=100_000, kernels=True, native_step=True) is False
    assert decide_compile("on", cpu, 1, key="k", expected_tokens=10, kernels=True, native_step=True) is True
    # CUDA: the captured eager step, except for weights that dequantize per call (int8) at 1-2 rows
    gpu = torch.device("cuda", 0)
    assert decide_compile("auto", gpu, 1, key="k", expected_tokens=10_000) is False
    assert decide_compile("auto", gpu, 1, key="other", expected_tokens=1000, quantized=True) is False
    assert decide_compile("auto", gpu, 1, key="other", expected_tokens=4000, quantized=True) is True
    assert decide_compile("auto", gpu, 1, key="k", expected_tokens=32, quantized=True) is True  # kept
    assert decide_compile("auto", gpu, 16, key="k", expected_tokens=10_000, quantized=True) is False


def native_cpu_ok() -> bool:
    from llama_cli import native

    return native._cpu_ok() is None


def test_compile_subcommand_then_auto_uses_the_kept_step(tmp_path, tiny_ckpt):
    """llama-cli compile leaves the step on disk; a later separate run with --compile auto (a job of 200
    tokens, which would otherwise stay eager) starts with it, and says how long loading it took. That is
    without our CPU kernels (LLAMA_CLI_NATIVE=0, as on CPUs they are not built for); with them the eager
    step is fast enough that the same job stays eager (a kept step repays from 512 tokens)."""
    env = {**subprocess_env(), "LLAMA_CLI_CACHE": str(tmp_path / "cache"), "LLAMA_CLI_NATIVE": "0"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    folder = tiny_ckpt[0]
    cmd = [sys.executable, "-m", "llama_cli"]
    proc = subprocess.run(cmd + ["compile", "--ckpt_dir", str(folder), "--max_seq_len", "256"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"for 1 row\(s\) on \d+ thread\(s\) in [\d.]+ s; later runs with as many use it", proc.stderr)
    assert list((tmp_path / "cache" / "compiled").glob("*.json"))
    assert list((tmp_path / "cache" / "inductor").iterdir())  # inductor's artifacts kept under our cache
    import platform

    if sys.platform == "linux" and platform.machine() == "x86_64":  # the vector-ISA probe's outcome, kept
        assert (tmp_path / "cache" / "compiled" / "vec_isa.json").is_file()
        # and the precompiled header inductor's C++ was compiled against, kept beside it (not in /tmp)
        assert list((tmp_path / "cache" / "inductor" / "precompiled_headers").glob("*.h.gch"))
    proc = subprocess.run(cmd + ["--ckpt_dir", str(folder), "--prompt", "Hello", "--max_gen_len", "200",
                                 "--max_seq_len", "256",
                                 "--max_batch_size", "1", "--temperature", "0"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "compiled the decode step for 1 row(s)" in proc.stderr
    assert "compiling/capturing the decode step" in proc.stderr
    env.pop("LLAMA_CLI_NATIVE")
    proc = subprocess.run(proc.args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    if native_cpu_ok():
        assert "use our CPU kernel" in proc.stderr and "compiled the decode step" not in proc.stderr
        # and compiling ahead says that auto will not use what it compiles
        proc = subprocess.run(cmd + ["compile", "--ckpt_dir", str(folder), "--max_seq_len", "256"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "--compile auto will not use this compiled step" in proc.stderr


def test_compile_ahead_for_runs_that_quantize_at_load_with_a_half_width_cache(tmp_path, tiny_ckpt):
    """llama-cli compile takes the run's --quantize, --group_size and --kv_cache_dtype: a later run with the same
    ones finds the step kept (a job of 100 tokens, which for eager int8 steps compiles only when kept); a run with
    a cache of another width does not (it stays eager). Without our kernels, as on CPUs they are not built for."""
    env = {**subprocess_env(), "LLAMA_CLI_CACHE": str(tmp_path / "cache"), "LLAMA_CLI_NATIVE": "0"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    folder = tiny_ckpt[0]
    cmd = [sys.executable, "-m", "llama_cli"]
    form = ["--max_seq_len", "256", "--quantize", "int8", "--group_size", "32", "--kv_cache_dtype", "bf16"]
    proc = subprocess.run(cmd + ["compile", "--ckpt_dir", str(folder), *form], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = cmd + ["--ckpt_dir", str(folder), "--prompt", "Hello", "--max_gen_len", "100", "--max_batch_size", "1",
                 "--temperature", "0"]
    proc = subprocess.run(run + form, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "compiled the decode step for 1 row(s)" in proc.stderr
    proc = subprocess.run(run + form[:-1] + ["fp32"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "compiled the decode step" not in proc.stderr
    proc = subprocess.run(cmd + ["compile", "--ckpt_dir", str(folder), "--quantize", "int3"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "llama-cli: error: --quantize must be int8 or int4, got 'int3'"


def test_isa_probe_outcome_is_reused_only_where_it_matches(tmp_path, monkeypatch):
    """Inductor's vector-ISA probe runs once per machine (recorded); its outcome tells inductor to skip the
    probe only when recorded on this CPU, compiler and torch, and when every ISA the CPU claims passed."""
    import json

    import torch._inductor.config as config

    from llama_cli import compiled

    monkeypatch.setenv("LLAMA_CLI_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    fp = compiled._isa_fingerprint()
    record = tmp_path / "compiled" / "vec_isa.json"
    if fp is None:  # not x86 Linux: nothing is recorded or reused
        compiled._reuse_isa_probe()
        assert config.cpp.vec_isa_ok is None and not record.exists()
        return
    compiled._reuse_isa_probe()  # no record: probes, records
    rec = json.loads(record.read_text())
    assert rec["fingerprint"] == fp[0]
    assert config.cpp.vec_isa_ok is (True if rec["passed"] == fp[1] else None)
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    record.write_text(json.dumps({"fingerprint": fp[0], "passed": fp[1][1:]}))  # an ISA the probe refused
    compiled._reuse_isa_probe()
    assert config.cpp.vec_isa_ok is None
    record.write_text(json.dumps({"fingerprint": "another machine", "passed": fp[1]}))
    compiled._reuse_isa_probe()  # probes again here
    assert json.loads(record.read_text())["fingerprint"] == fp[0]


PROBE_COUNT = """
import subprocess, sys
spawned = []
real = subprocess.run
def run(cmd, *a, **k):
    if isinstance(cmd, list) and cmd[:2] == [sys.executable, "-c"]:
        spawned.append(cmd)
    return real(cmd, *a, **k)
subprocess.run = run
from llama_cli import compiled
compiled.setup()
from torch._inductor import cpu_vec_isa as v
print(v.pick_vec_isa(), len(spawned))
"""


def test_isa_probe_libraries_that_loaded_are_not_loaded_again(tmp_path):
    """Inductor's finer vector-ISA checks (AVX-512 BF16, VNNI, AMX) load a probe library each in a new Python
    process, in every process, whatever vec_isa_ok says. A library that loaded before on this machine (listed in
    our record) counts as loaded: a later process spawns none of those processes and picks the same ISA; a record
    made on another machine (CPU, compiler, torch) counts for nothing."""
    import json
    import platform

    env = {**subprocess_env(), "LLAMA_CLI_CACHE": str(tmp_path)}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_VEC_ISA_OK"):
        env.pop(name, None)

    def run():
        proc = subprocess.run([sys.executable, "-c", PROBE_COUNT], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        isa, spawned = proc.stdout.strip().rsplit(" ", 1)
        return isa, int(spawned)

    first, spawned = run()
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return  # nothing recorded there
    loaded = json.loads((tmp_path / "compiled" / "vec_isa.json").read_text())["loaded"]
    assert len(loaded) == spawned >= 1  # at least the base probe of each ISA the CPU claims
    assert run() == (first, 0)
    record = tmp_path / "compiled" / "vec_isa.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": "another machine"}))
    assert run() == (first, spawned)  # a record made elsewhere: every library is loaded again, and listed
    assert json.loads(record.read_text())["loaded"] == loaded


def test_kept_step_is_keyed_by_the_cache_size(tiny_ckpt):
    """The compiled graph holds the KV cache's shape (module state), so a step kept for one cache size
    does not count as compiled for another (that run would compile, not load)."""
    from llama_cli import compiled

    folder = tiny_ckpt[0]
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1, compile="off")

    def key(rows, length):
        return compiled.shape_key(llama.model, torch.float32, llama.device, (rows, length))

    assert key(1, 512) == key(1, 512) and len({key(1, 512), key(1, 256), key(2, 512)}) == 3


def test_kept_step_is_keyed_by_the_thread_count(tiny_ckpt, keep_threads):
    """Inductor's C++ kernels are made for the thread count they were compiled under (its cache key holds
    it), so a step kept under one --threads does not count as compiled under another (auto would expect a
    quick load and meet a whole compile)."""
    from llama_cli import compiled

    folder = tiny_ckpt[0]
    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 1, compile="off", threads=1)
    assert torch.get_num_threads() == 1
    one = compiled.shape_key(llama.model, torch.float32, llama.device)
    torch.set_num_threads(2)
    assert compiled.shape_key(llama.model, torch.float32, llama.device) != one
    torch.set_num_threads(1)
    assert compiled.shape_key(llama.model, torch.float32, llama.device) == one


def test_compiled_step_with_weights_kept_in_bf16(tmp_path, spm_path):
    """A bf16 checkpoint on the CPU keeps its linear weights in bf16 under fp32 activations (where our kernels
    run): the compiled step widens them inside its fused products and agrees with the uncompiled one; its kept
    step is keyed apart from the widened model's."""
    from helpers import TINY, make_model_folder

    from llama_cli import compiled, native

    folder, _ = make_model_folder(tmp_path / "m", spm_path, TINY, seed=12, dtype=torch.bfloat16)
    tok = str(folder / "tokenizer.model")
    fast = Llama.build(str(folder), tok, 64, 1, compile="on")
    plain = Llama.build(str(folder), tok, 64, 1, compile="off")
    wide = Llama.build(str(folder), tok, 64, 1, compile="off", dtype="fp32")
    kept = torch.bfloat16 if native.available() else torch.float32
    assert fast.model.layers[0].feed_forward.w1.weight.dtype == kept
    ids = [1, 5, 9, 13]
    calls, real = [], fast.engine._run_compiled
    fast.engine._run_compiled = lambda *a: calls.append(1) or real(*a)
    got = fast.generate([ids], max_gen_len=8, temperature=0)[0][0]
    assert len(calls) == 7  # every decode step compiled
    assert_same_or_near_tie(plain, ids, got, plain.generate([ids], max_gen_len=8, temperature=0)[0][0])
    key = [compiled.shape_key(x.model, torch.float32, x.device) for x in (fast, wide)]
    assert (key[0] != key[1]) == native.available()


def test_module_guards_are_skipped_only_for_uniform_layers_and_own_code(tmp_path, spm_path):
    """On the CPU the compiled layer skips dynamo's guards on modules (their checks cost every call) where
    that is safe: all layers have one structure, and each model compiles its own copy of the layer function,
    so a model of another structure compiled in the same process never runs the first one's code."""
    from helpers import TINY, make_model_folder

    from llama_cli.engine import uniform_layers
    from llama_cli.model import run_block

    big = {**TINY, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 128}
    folder, _ = make_model_folder(tmp_path / "m", spm_path, big, seed=11)
    tok = str(folder / "tokenizer.model")
    ids = [1, 5, 9, 13]
    for quantize in ("int4", None):  # the same shapes, another structure: quantized layers, then dense ones
        compiled = Llama.build(str(folder), tok, 64, 1, compile="on", quantize=quantize)
        eager = Llama.build(str(folder), tok, 64, 1, compile="off", quantize=quantize)
        assert uniform_layers(compiled.model)
        assert compiled.model.decode_block_fn._torchdynamo_orig_callable.__code__ is not run_block.__code__
        got = compiled.generate([ids], max_gen_len=8, temperature=0)[0][0]
        assert_same_or_near_tie(eager, ids, got, eager.generate([ids], max_gen_len=8, temperature=0)[0][0])
    # a layer unlike the others (as a GGUF file mixing forms): not uniform, so its guards stay
    llama = Llama.build(str(folder), tok, 64, 1, compile="off", quantize="int4")
    assert uniform_layers(llama.model)
    llama.model.layers[1].attention.wq.kernel = None if llama.model.layers[0].attention.wq.kernel else "int4-native"
    assert not uniform_layers(llama.model)


def test_a_cache_without_room_is_said_before_any_work(tmp_path, monkeypatch, capsys, caplog, tiny_ckpt):
    """Found with a full disk: --compile on failed only when inductor first wrote its cache ("No space left on
    device", nothing more), our CPU kernels spent their 9 s build before ninja failed. Now a cache folder
    without ROOM_MB free (a compile: HEADER_ROOM_MB, until a precompiled header is kept) is told at once: --compile
    on (and llama-cli compile) refuse with what to do, --compile auto leaves compiling off with a warning, and the
    kernels are not built (the portable products run)."""
    import shutil

    from llama_cli import compiled, native
    from llama_cli.cli import cli
    from llama_cli.engine import decide_compile
    from llama_cli.errors import UserError

    monkeypatch.setenv("LLAMA_CLI_CACHE", str(tmp_path / "cache"))
    real = shutil.disk_usage(tmp_path)
    assert compiled.room_problem(tmp_path / "cache" / "not" / "yet") is None  # made later: its parents are asked
    (tmp_path / "a-file").write_text("x")  # LLAMA_CLI_CACHE=a file: nothing could be kept ("kept" was said)
    assert compiled.room_problem(tmp_path / "a-file" / "inductor").startswith(f"{tmp_path / 'a-file'} is a file")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real._replace(free=5 * 2**20))
    why = compiled.room_problem(tmp_path / "cache" / "inductor")
    assert why == f"the disk holding {tmp_path / 'cache' / 'inductor'} has 5 MB free (about 64 MB are needed there)"
    # a compile also needs room for a precompiled header (~150 MB), unless one is kept there already
    assert compiled.compile_room_problem() == why.replace("about 64 MB", "about 256 MB")
    compiled.header_dir().mkdir(parents=True)
    (compiled.header_dir() / "c0.h.gch").write_text("x")
    assert compiled.compile_room_problem() == why
    (compiled.header_dir() / "c0.h.gch").unlink()

    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="cannot compile the decode step: the disk holding .* has 5 MB free .*"
                       "make room there, set LLAMA_CLI_CACHE to another folder, or pass --compile off"):
        decide_compile("on", cpu, 1)
    with caplog.at_level("WARNING", logger="llama_cli"):
        assert decide_compile("auto", cpu, 1, key="k", expected_tokens=10_000) is False  # it would, with room
    assert "not compiling the decode step: the disk holding" in caplog.text
    assert decide_compile("off", cpu, 1) is False

    folder = tiny_ckpt[0]
    assert cli(["compile", "--ckpt_dir", str(folder)]) == 2
    assert "error: cannot compile: the disk holding" in capsys.readouterr().err
    from llama_cli import generation  # --compile on in a generation: before the load, not after its minutes

    monkeypatch.setattr(generation, "_load_model", lambda *a, **k: pytest.fail("loaded without room to compile"))
    assert cli(["--ckpt_dir", str(folder), "--prompt", "hi", "--compile", "on"]) == 2
    assert "error: cannot compile the decode step: the disk holding" in capsys.readouterr().err

    monkeypatch.setattr(native, "_state", {})  # as in a fresh process (restored after the test)
    monkeypatch.setattr(native, "_loadable", lambda build: False)  # nothing kept: it would build
    monkeypatch.setattr(native, "_load", lambda build: pytest.fail("built without room"))
    if native._cpu_ok() is None:
        assert native.ready() is False
        assert native._state["why"].startswith("were not built: the disk holding")
