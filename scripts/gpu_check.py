"""The one GPU call: checks and timings on a machine with a CUDA GPU, in one process (plus subprocesses
for Meta's reference and the cold command line), printing PASS/FAIL lines and a table; exit 1 on a failure.

    python scripts/gpu_check.py [--meta PATH] [--tokenizer PATH] [--out DIR] [--budget S] [--only A,B]
                                [--quick] [--skip_7b]

In this order (correctness first; each part is skipped with a SKIP line when the --budget, default 540 s,
has too little left for it, and results are written to --out after every check and row):
1. NCCL: the backend picked for a CUDA device, a 1-process NCCL group and an all_reduce.
2. Tiny random model, bf16: greedy tokens of the eager, CUDA-graph and compiled+graph decode steps agree
   (where they part, the two tokens must be a near-tie of the eager model's logits), and bf16 GPU greedy
   starts like fp32 CPU greedy; prompts after a shared beginning (--share_prefixes) each as alone.
3. Tiny model quantized (int8, int4): logits on CUDA (the default forms: our Triton kernels at 1-2 rows,
   past them tinygemm for int4) equal to the CPU model on the dequantized weights within bf16's error;
   greedy tokens of eager, graphs and compiled + graphs.
   Then random tiny configurations (scripts/fuzz_batching.py, fp32, graphs) batched and each prompt alone:
   the same tokens up to near-ties of 1e-3 (also in the dry run).
4. Llama-2-7B shape, random bf16 weights made on the GPU: the copy bandwidth; the decode table at batch 1
   and 16 (16-token prompt, 256 greedy tokens, stop token masked) for llama-cli CUDA graphs, eager and
   compiled + CUDA graphs, and a per-kernel profile of one eager step; batch 1 quantized at load (int8 per
   row, int4 groups of 32) against the bf16 rate; the one-prompt command line from a fresh process (its
   wall time against load + 5 s + generation); decode at max_seq_len 256 vs 4096 (batch 1 and 16, static
   and continuous); continuous vs static batching on 64 mixed prompts (bf16, where the schedules' greedy
   tokens part: near-ties?) and on 32 in fp32 (near-ties of 1e-3); HF transformers eager; Meta's
   reference (its own loop, fp16, in a subprocess; --meta names a folder holding Meta's `llama` package).
   Where the budget allows (or with --only quant_candidates), int4 and int8 through each form
   (quant.CUDA_INT4 / CUDA_INT8): our Triton kernels ("triton", the default at 1-2 rows), int4 fused by the
   compiler ("fused"), tinygemm, groups of 32 and 128, batch 1; then a table of each product alone (cuBLAS,
   tinygemm, every Triton configuration) at the 7B weight sizes. Named in --only, b16_candidates:
   batch 16 compiled with inductor's max-autotune. Last, fused_rows: the captured step with
   model.FUSED_SMALL_OPS (triton_step.py) against the plain one, logits first.
--quick (a second look after changes): no compiled decode rows, int8 and int4 g32 captured as the quantized rows,
the tiny check for int8 only, the changed parts first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

PROMPT_LEN, NEW = 16, 256
# GPU_CHECK_DRY=1: the 7B part's plumbing on the CPU with a small shape (to check this script without a GPU)
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
SHAPE = ({"dim": 256, "n_layers": 2, "n_heads": 8, "multiple_of": 128} if DRY else
         {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256})
RESULTS: dict = {"checks": [], "table": [], "notes": {}}
FAILURES = 0


def say(*a):
    print(*a, flush=True)


OUT_DIR = None  # --out: results are written there after every check and row (a run cut short keeps them)
START = time.perf_counter()
BUDGET = 1e9  # --budget: seconds for the whole run; a part that would not fit is skipped (a SKIP line)
ONLY = None  # --only: the parts to run (default: all)
QUICK = False  # --quick: no compiled rows in the decode table; of the quantized rows int8 and int4 g32 captured


def save():
    if OUT_DIR:
        RESULTS["seconds"] = time.perf_counter() - START
        (OUT_DIR / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))


def check(name, ok, detail=""):
    global FAILURES
    FAILURES += not ok
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": str(detail)})
    say(f"{'PASS' if ok else 'FAIL'} {name} {detail}")
    save()


def section(seconds):
    """One part, expected to take about `seconds` on an H100: skipped when the budget has less left; an
    exception is a FAIL line, and the rest still runs."""
    def wrap(fn):
        def run(*a, **k):
            spent = time.perf_counter() - START
            if ONLY is not None and fn.__name__ not in ONLY:
                return None
            need = seconds() if callable(seconds) else seconds
            if spent + need > BUDGET:
                say(f"SKIP {fn.__name__}: {BUDGET - spent:.0f} s of the budget left, it needs about {need} s")
                RESULTS["skipped"] = RESULTS.get("skipped", []) + [fn.__name__]
                save()
                return None
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - report and go on
                check(f"{fn.__name__} ran", False, f"{type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                RESULTS["notes"].setdefault("section_s", {})[fn.__name__] = round(time.perf_counter() - t, 1)
                say(f"[{fn.__name__}: {time.perf_counter() - t:.0f} s; {time.perf_counter() - START:.0f} s in all]")
                save()
        return run
    return wrap


def sync():
    import torch

    if not DRY:
        torch.cuda.synchronize()


@section(5)
def nccl():
    import torch
    import torch.distributed as dist

    from llama_cli.distributed import backend_for

    dev = torch.device("cuda", 0)
    check("backend for cuda is nccl", backend_for(dev) == "nccl", backend_for(dev))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", device_id=dev)
    x = torch.ones(4, device=dev)
    dist.all_reduce(x)
    check("nccl all_reduce", bool((x == 1).all()))
    dist.destroy_process_group()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        os.environ.pop(k)


class untuned:
    """The tiny checks compile without coordinate-descent tuning: it changes kernel configurations, not
    results, and took most of their ~100 s."""

    def __enter__(self):
        from llama_cli import engine

        self.saved, engine.CUDA_COMPILE_OPTIONS = engine.CUDA_COMPILE_OPTIONS, {}

    def __exit__(self, *exc):
        from llama_cli import engine

        engine.CUDA_COMPILE_OPTIONS = self.saved


@section(120)  # 121 s on an H100 (fifteenth session)
def tiny_agreement(tmp: Path):
    import torch

    from helpers import TINY, make_model_folder, train_sentencepiece
    from llama_cli import Llama

    tok = train_sentencepiece(tmp / "tok.model")
    folder, _ = make_model_folder(tmp / "tiny", tok, TINY)
    prompts = ["Hello world", "The cat sleeps under the tree because", "42"]
    runs, models = {}, {}
    for name, kw in (("cpu-fp32", dict(device="cpu", dtype="fp32", compile="off")),
                     ("eager", dict(dtype="bf16", compile="off", cuda_graphs="off")),
                     ("graphs", dict(dtype="bf16", compile="off", cuda_graphs="on")),
                     ("compiled+graphs", dict(dtype="bf16", compile="on", cuda_graphs="on"))):
        llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 96, 4, **kw)
        ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        runs[name] = llama.generate(ids, max_gen_len=24, temperature=0)[0]
        models[name] = llama
    first = [r[:4] for r in runs["cpu-fp32"]]
    check("bf16 GPU greedy starts like fp32 CPU greedy (4 tokens)", [r[:4] for r in runs["eager"]] == first)
    # prefill graphs (a refill's shape captured at its second use): the eager prefill's logits
    eng, ref_eng = models["graphs"].engine, models["eager"].engine
    for k in range(3):
        p = [[5 + k, 9, 14, 3] * 5, [7, 8] * (3 + k)]
        got, want = eng.prefill([0, 1], p).float(), ref_eng.prefill([0, 1], p).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
    check("prefill graph == eager prefill (bf16 error)", bool(eng._prefill_graphs) and err < 2e-2,
          f"relative error {err:.2e}; graphs {sorted(eng._prefill_graphs)}")
    eager = models["eager"]

    def parting(outputs) -> float:  # the largest near-tie gap where outputs part from the eager run's
        return max(gap_where_they_part(eager, eager.tokenizer.encode(p, bos=True, eos=False), got, want)
                   for p, got, want in zip(prompts, outputs, runs["eager"]))

    for name in ("graphs", "compiled+graphs"):
        worst = parting(runs[name])
        # bf16 logits: a near-tie is within 1% of the logit scale (the CPU tests use 1e-3 in fp32)
        check(f"{name} greedy == eager greedy, up to near-ties (GPU bf16)", worst <= 1e-2,
              f"largest gap where they part: {worst:.2e} of the logit scale")
    # --kv_cache_dtype: an fp16 cache under bf16 activations, its casts captured in the graphs (last: a failure
    # here leaves the checks above standing)
    half = Llama.build(str(folder), str(folder / "tokenizer.model"), 96, 4, dtype="bf16", compile="off",
                       cuda_graphs="on", kv_cache_dtype="fp16")
    ids = [half.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    worst = parting(half.generate(ids, max_gen_len=24, temperature=0)[0])
    check("graphs with an fp16 KV cache == eager greedy, up to near-ties (GPU bf16)",
          worst <= 1e-2 and half.model.layers[0].attention.cache_k.dtype == torch.float16,
          f"largest gap where they part: {worst:.2e} of the logit scale")
    shared_beginnings(models["graphs"], "GPU bf16, graphs", 1e-2)


def gap_where_they_part(llama, ids: list, got: list, want: list) -> float:
    """Where two greedy continuations of prompt ids first differ, how near a tie their two tokens are in llama's
    logits there (helpers.near_tie_gap: a fraction of the logit scale); 0 where they agree."""
    import torch

    from helpers import near_tie_gap

    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        return 0.0
    logits = llama.model(torch.tensor([ids + want[:k]]))[0, -1].float()
    return near_tie_gap(logits, got[k], want[k])


def shared_beginnings(llama, where: str, tie: float) -> None:
    """--share_prefixes: prompts after one shared beginning, through the continuous schedule (rows copied and
    prefilled after it), each the same as alone, up to near-ties of `tie` of the logit scale."""
    from helpers import requests
    from llama_cli.scheduler import Options, run_continuous

    texts = ["the cat sleeps under the tree because " + t for t in ("hello world", "42", "the sun", "")]
    got, calls, real = {}, [], llama.engine.prefill_after
    llama.engine.prefill_after = lambda *a: calls.append(a) or real(*a)
    try:
        run_continuous(llama, requests(texts, temperature=0, max_gen_len=12), Options(),
                       lambda r: got.__setitem__(r.request.index, r.tokens))
    finally:
        llama.engine.prefill_after = real
    worst = 0.0
    for i, text in enumerate(texts):
        ids = llama.tokenizer.encode(text, bos=True, eos=False)
        alone = llama.generate([ids], max_gen_len=12, temperature=0)[0][0]
        worst = max(worst, gap_where_they_part(llama, ids, got[i], alone))
    check(f"shared prompt beginnings == each prompt alone, up to near-ties ({where})", bool(calls) and worst <= tie,
          f"{sum(len(c[0]) for c in calls)} prompts after a copied beginning; largest gap where they part: "
          f"{worst:.2e} of the logit scale")


@section(40)
def tiny_batching(tmp: Path):
    """scripts/fuzz_batching.py on the GPU: random tiny configurations batched by either schedule (CUDA graphs,
    prefill graphs, each step launched ahead) and each prompt alone, in fp32, so the CPU tests' near-tie rule
    (1e-3) applies; quantization left out (CUDA's int4 kernel takes bf16). Where the 7B bf16 schedules' tokens
    part (batching_rows), this tells a bug from rounding."""
    from fuzz_batching import fuzz

    from helpers import train_sentencepiece

    trials = 16
    n, stats, found = fuzz(trials=trials, seed=0, device=DEV, spm=train_sentencepiece(tmp / "fuzz.model"),
                           dtype="fp32", quantize=False)
    RESULTS["notes"]["tiny_batching"] = {"trials": n, "tokens": stats["tokens"], "differences": found}
    check(f"batched == alone on {trials} random tiny configurations (fp32, graphs)", not found,
          f"{stats['tokens']} tokens compared, {len(found)} differences" + (f"; first: {found[0]}" if found else ""))


@section(lambda: 60 if QUICK else 90)
def tiny_quantized(tmp: Path):
    """int8 and int4 through CUDA's kernels (eager, graphs, compiled + graphs): the same logits as the
    CPU model on the dequantized weights, within bf16's error; and the greedy tokens of the three steps."""
    import torch

    from helpers import TINY, make_model_folder, train_sentencepiece
    from llama_cli import Llama

    tok = train_sentencepiece(tmp / "tokq.model")
    folder, _ = make_model_folder(tmp / "tinyq", tok, {**TINY, "dim": 128, "multiple_of": 128})
    seq = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    for mode in ("int8",) if QUICK else ("int8", "int4"):
        cpu = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 2, device="cpu", dtype="fp32",
                          compile="off", quantize=mode)
        ref = cpu.model(seq)
        runs = {}
        for name, kw in (("eager", dict(compile="off", cuda_graphs="off")),
                         ("compiled+graphs", dict(compile="on", cuda_graphs="on")),
                         ("graphs", dict(compile="off", cuda_graphs="on")))[:2 if QUICK else 3]:
            if name == "eager":  # the default forms for 1-2 rows (Triton) and past them (int4: tinygemm)
                for rows in (2, 4):
                    llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, rows, dtype="bf16",
                                        quantize=mode, **kw)
                    kinds = sorted({str(getattr(m, "kernel", None)) for m in llama.model.modules()
                                    if getattr(m, "qweight", None) is not None})
                    got = llama.model(seq.to(llama.device)).float().cpu()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    check(f"{mode} on CUDA, --max_batch_size {rows} (layers: {kinds}) == CPU dequantized model "
                          "(bf16 error)", (kinds != ["None"] or mode == "int8") and err < 0.1,
                          f"relative error {err:.2e}")  # a wrong packing: ~1
            llama = Llama.build(str(folder), str(folder / "tokenizer.model"), 64, 2, dtype="bf16", quantize=mode, **kw)
            runs[name] = llama.generate(seq.tolist(), max_gen_len=16, temperature=0)[0]
        check(f"{mode}: graphs and compiled+graphs greedy == eager greedy (first 8 tokens)",
              all([r[:8] for r in runs[k]] == [r[:8] for r in runs["eager"]] for k in runs), "")


def quantized_b1(folder: Path, tok: str, mode: str, group, comp: str, prompts):
    """The 7B-shape model quantized at load for batch 1 (CUDA graphs; compiled too where comp is "on"), timed on
    one prompt: (llama, ttft s, decode tok/s)."""
    from llama_cli import Llama

    llama = Llama.build(str(folder), tok, PROMPT_LEN + NEW + 8, 1, cuda_graphs="auto" if DRY else "on",
                        compile=comp, dtype="bf16", device=DEV, quantize=mode, group_size=group)
    quiet_stops(llama)
    ttft, rate = time_generate(lambda n: llama.generate(prompts, max_gen_len=n, temperature=0), 1, NEW,
                               lambda: llama.engine)
    return llama, ttft, rate


@section(lambda: 75 if QUICK else 220)
def quant_rows(folder: Path, tok: str, wbytes: int, bw: float):
    """Batch 1 decode of the 7B shape quantized at load (int8 per row, int4 groups of 32 and 128) against the
    bf16 rate of the decode table, through the default forms for one row (quant.cuda_forms: our Triton
    kernels), CUDA graphs alone and compiled + CUDA graphs (int8 and int4 g128: the targets' best candidates
    against bf16's best rate); and beside them int4's form past 2 rows (tinygemm)."""
    import torch

    from llama_cli import quant

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 32000, (1, PROMPT_LEN), generator=g).tolist()
    best = {}
    saved = quant.CUDA_INT4, quant.CUDA_INT8
    # the default forms (Triton at 1 row), captured, then compiled + captured (the targets are against bf16's
    # best, its compiled rate: int8 and int4 g128 compiled were not yet timed), then int4 past 2 rows (tinygemm)
    # at groups of 128, where the fifteenth session's product table had it 10-25% faster a call than ours
    rows = (("int8", "CUDA graphs", "off", None), ("int4", "CUDA graphs", "off", 32),
            ("int4", "CUDA graphs", "off", 128), ("int4", "compiled + CUDA graphs", "on", 128),
            ("int8", "compiled + CUDA graphs", "on", None), ("int4", "tinygemm, CUDA graphs", "off", 128))
    for mode, impl, comp, group in rows[:2 if QUICK else 6]:
        quant.CUDA_INT4, quant.CUDA_INT8 = ("tinygemm", "compiled") if "tinygemm" in impl else saved
        try:
            llama, ttft, rate = quantized_b1(folder, tok, mode, group, comp, prompts)
        finally:
            quant.CUDA_INT4, quant.CUDA_INT8 = saved
        kern = sorted({str(getattr(m, "kernel", None)) for m in llama.model.modules()
                       if getattr(m, "qweight", None) is not None})
        row(f"llama-cli {mode}{f' g{group}' if group else ''} {impl}", 1, rate, ttft, wbytes, bw,
            f"capture/compile {llama.engine.warmup_s:.1f} s; kernels {kern}")
        if comp == "off" and group == 128 and not QUICK:  # where the quantized steps' time goes: ours, tinygemm
            profile_step(llama, f"step_profile_int4_{'tinygemm' if 'tinygemm' in impl else 'triton'}")
        best[mode] = max(best.get(mode, 0.0), rate)
        RESULTS["notes"][f"{mode}_g{group}_{impl}_b1"] = rate
        llama = None
        free()
        base = RESULTS["notes"].get("bf16_b1_best")
        if base:
            RESULTS["notes"][f"{mode}_b1_ratio"] = best[mode] / base
    base = RESULTS["notes"].get("bf16_b1_best")
    if base and not QUICK:
        for mode, target in (("int8", 1.6), ("int4", 2.5)):
            check(f"{mode} batch 1 >= {target}x the bf16 rate", best[mode] >= target * base,
                  f"{best[mode]:.1f} vs {base:.1f} tok/s ({best[mode] / base:.2f}x)")


@section(330)  # 313 s on an H100 (fifteenth session)
def quant_candidates(tmp: Path, folder: Path, tok: str, wbytes: int, bw: float):
    """int4 and int8 per row at batch 1 through each form (past 2 rows: tinygemm, int8's compiled
    multiply-and-sum; for 1-2 rows by default our Triton kernels): quant.CUDA_INT4 "fused" (our int4 form, the
    unpacking fused into a compiled step's multiply-and-sum) and "triton" / CUDA_INT8 "triton" (triton_gemv.py,
    fast without compiling). First the
    tiny model (one row and a whole pass against the CPU's dequantized model; greedy of eager against the
    form's fast step), then the 7B shape, each row against the bf16 rate; a candidate that fails is a FAIL
    line and the others still run; then the configurations the Triton kernels' autotuning chose."""
    import torch

    from helpers import TINY, make_model_folder, train_sentencepiece
    from llama_cli import Llama, quant, triton_gemv

    spm = train_sentencepiece(tmp / "tokf.model")
    tiny, _ = make_model_folder(tmp / "tinyf", spm, {**TINY, "dim": 128, "multiple_of": 128})
    seq = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    ttok = str(tiny / "tokenizer.model")
    saved = quant.CUDA_INT4, quant.CUDA_INT8

    def use(mode, form):
        quant.CUDA_INT4, quant.CUDA_INT8 = (form, "compiled") if mode == "int4" else ("tinygemm", form)

    try:
        with untuned():
            # the fused form is fast only compiled, the Triton kernels without compiling (their compiled rows
            # at the 7B shape below)
            for mode, form, steps in (("int4", "fused", ("eager", "compiled+graphs")),
                                      ("int4", "triton", ("eager", "graphs")), ("int8", "triton", ("eager", "graphs"))):
                ref = Llama.build(str(tiny), ttok, 64, 2, device="cpu", dtype="fp32", compile="off",
                                  quantize=mode).model(seq)
                use(mode, form)
                runs = {}
                for name in steps:
                    comp = "on" if name == "compiled+graphs" else "off"
                    try:
                        llama = Llama.build(str(tiny), ttok, 64, 2, dtype="bf16", device=DEV, compile=comp,
                                            cuda_graphs="off" if name == "eager" else "auto", quantize=mode)
                        if name == "eager":
                            wq = llama.model.layers[0].attention.wq
                            x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(5)).to(llama.device)
                            one = wq(x.bfloat16()).float().cpu()  # one row: the kernel
                            want = x.float().cpu() @ quant.dequantize(*(None if t is None else t.cpu() for t in (
                                wq.qweight, wq.qscale, wq.qoffset))).T
                            got = llama.model(seq.to(llama.device)).float().cpu()
                            err = max(((got - ref).abs().max() / ref.abs().max()).item(),
                                      ((one - want).abs().max() / want.abs().max()).item())
                            check(f"{mode} {form} on CUDA == CPU dequantized model (bf16 error; kernel "
                                  f"{wq.kernel})", err < 0.1, f"relative error {err:.2e}")
                        runs[name] = llama.generate(seq.tolist(), max_gen_len=16, temperature=0)[0]
                    except Exception as e:  # noqa: BLE001 - one candidate's failure is reported, the rest run
                        check(f"{mode} {form} {name} runs", False, f"{type(e).__name__}: {e}")
                fast = steps[1]
                check(f"{mode} {form}: {fast} greedy == eager greedy (first 8 tokens)",
                      len(runs) == 2 and [r[:8] for r in runs[fast]] == [r[:8] for r in runs["eager"]])
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, 32000, (1, PROMPT_LEN), generator=g).tolist()
        base = RESULTS["notes"].get("bf16_b1_best")
        # (quant_rows has tinygemm and int8's multiply-and-sum, compiled, and the third session's figures too)
        for mode, form, group, comp in (("int4", "triton", 32, "off"), ("int4", "triton", 128, "off"),
                                        ("int8", "triton", None, "off"), ("int4", "triton", 32, "on"),
                                        ("int4", "triton", 128, "on"), ("int8", "triton", None, "on")):
            use(mode, form)
            impl = f"{mode}{f' g{group}' if group else ''} {form}, " + (
                "compiled + CUDA graphs" if comp == "on" else "CUDA graphs")
            try:
                llama, ttft, rate = quantized_b1(folder, tok, mode, group, comp, prompts)
                warm = llama.engine.warmup_s
            except Exception as e:  # noqa: BLE001
                check(f"{impl} runs", False, f"{type(e).__name__}: {e}")
                continue
            finally:
                llama = None
                free()
            ratio = f"; {rate / base:.2f}x bf16" if base else ""
            row(f"llama-cli {impl}", 1, rate, ttft, wbytes, bw, f"capture/compile {warm:.1f} s{ratio}")
            RESULTS["notes"][f"{mode}_g{group}_{form}_{comp}_b1"] = rate
        RESULTS["notes"]["triton_configs"] = triton_gemv.best_configs()
        say(f"Triton kernels, best configuration per weight shape: {triton_gemv.best_configs()}")
        kernel_table()
    finally:
        quant.CUDA_INT4, quant.CUDA_INT8 = saved


def _bench_us(fn) -> float:
    """Microseconds a call: Triton's do_bench on a GPU (the autotuner's own timer), a plain loop in the dry run."""
    if DRY:
        fn()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t) / 3 * 1e6
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40) * 1e3


def kernel_table():
    """One row through each product on its own, at the 7B shape's weights (stacked q/k/v, wo, stacked w1/w3,
    w2, output): cuBLAS bf16, tinygemm int4, and every configuration of our Triton kernels (int4 groups of 32
    and 128, int8 per row), in microseconds and GB/s of weight and table bytes. Which configuration and which
    way of loading x (X_TILE) wins, and by how much, is what a next kernel needs to know. (Dry run: a small
    shape, the Triton rows only under TRITON_INTERPRET=1.)"""
    import types

    import torch
    import torch.nn.functional as F

    from llama_cli import quant, triton_gemv as tg

    shapes = ((768, 256), (256, 256)) if DRY else ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008),
                                                   (32000, 4096))
    with_triton = tg.available() and (not DRY or os.environ.get("TRITON_INTERPRET") == "1")
    rows = RESULTS["notes"].setdefault("kernel_table", [])
    say("| product | weight | config | us | GB/s |")
    say("|---|---|---|---|---|")

    def add(product, n, k, config, us, nbytes):
        rows.append({"product": product, "shape": [n, k], "config": config, "us": round(us, 2),
                     "GBs": round(nbytes / us / 1e3, 1)})
        say(f"| {product} | {n}x{k} | {config} | {us:.1f} | {nbytes / us / 1e3:.0f} |")

    g = torch.Generator(device=DEV).manual_seed(3)
    with torch.inference_mode():
        for n, k in shapes:
            x = torch.randn(1, k, device=DEV, generator=g).bfloat16()
            w = (torch.randn(n, k, device=DEV, generator=g) * k ** -0.5).bfloat16()
            add("bf16 cuBLAS", n, k, "F.linear", _bench_us(lambda: F.linear(x, w)), 2 * n * k)
            for group in (32, 128):
                q, s, m = quant.quantize(w.float(), "int4", group)
                s, m = s.bfloat16().contiguous(), m.bfloat16().contiguous()
                nbytes = q.numel() + 2 * (s.numel() + m.numel())
                layer = types.SimpleNamespace(qweight=q, qscale=s, qoffset=m)
                if quant.kernel_form(layer, x.device):
                    add(f"int4 g{group} tinygemm", n, k, "", _bench_us(lambda: quant.kernel_linear(x, layer)), nbytes)
                for cfg in tg._int4_rows.configs if with_triton else ():
                    us = _bench_us(lambda: tg.int4_rows(x, q, s, m, config=cfg))
                    add(f"int4 g{group} triton", n, k, _config_name(cfg), us, nbytes)
            q, s, _ = quant.quantize(w.float(), "int8", 0)
            s = s.bfloat16().contiguous()
            for cfg in tg._int8_rows.configs if with_triton else ():
                us = _bench_us(lambda: tg.int8_rows(x, q, s, config=cfg))
                add("int8 triton", n, k, _config_name(cfg), us, q.numel() + 2 * s.numel())
            save()


def _config_name(cfg) -> str:
    kw = cfg.kwargs
    return (f"{kw['BLOCK_N']}x{kw.get('GROUP_BYTES', kw.get('BLOCK_K'))} w{cfg.num_warps} s{cfg.num_stages} "
            f"x{kw['X_TILE']}")


def make_7b(folder: Path):
    """Random Llama-2-7B-shape bf16 weights made on the GPU, saved as one Meta shard; returns them (on the
    CPU)."""
    import torch

    from helpers import model_args
    from llama_cli.checkpoint import weight_table

    params = {**SHAPE, "norm_eps": 1e-5, "vocab_size": 32000}
    args = model_args(params, 32000)
    g = torch.Generator(device=DEV).manual_seed(0)
    w = {}
    for name, (shape, _) in weight_table(args).items():
        if len(shape) == 1:
            w[name] = torch.ones(shape, dtype=torch.bfloat16, device=DEV)
        else:
            scale = 1.0 if name == "tok_embeddings.weight" else shape[-1] ** -0.5
            w[name] = (torch.randn(shape, generator=g, device=DEV, dtype=torch.float32) * scale).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    w = {k: v.cpu() for k, v in w.items()}  # kept for HF's rows, off the GPU
    torch.save(w, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    say(f"wrote the 7B-shape checkpoint in {time.perf_counter() - t:.1f} s")
    return params, w


def copy_bandwidth() -> float:
    import torch

    src = torch.empty(1 << (24 if DRY else 28), dtype=torch.float32, device=DEV).fill_(1.0)  # 1 GiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def row(impl, batch, rate, ttft, wbytes, bw, extra=""):
    gbs = wbytes * rate / batch / 1e9
    RESULTS["table"].append({"impl": impl, "batch": batch, "tok_s": rate, "ttft_ms": ttft * 1e3,
                             "pct_ceiling": 100 * gbs * 1e9 / bw, "extra": extra})
    save()
    say(f"| {impl} | {batch} | {rate:.1f} | {100 * gbs * 1e9 / bw:.1f}% | {ttft * 1e3:.1f} | {extra} |")


def time_generate(fn, batch, new, engine_of=None):
    """(ttft s, decode tok/s) of fn(max_gen_len): a warm-up over the whole length (graphs for every length
    bucket captured, compiling done), then 1 token, then `new` tokens; any capture still happening in the
    timed runs is taken out (engine_of: returns the engine whose warmup_s counts it)."""
    fn(new)
    sync()
    w0 = engine_of().warmup_s if engine_of else 0.0
    t = time.perf_counter()
    fn(1)
    sync()
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    fn(new)
    sync()
    total = time.perf_counter() - t - ((engine_of().warmup_s - w0) if engine_of else 0.0)
    return ttft, batch * (new - 1) / max(total - ttft, 1e-9)


def ours_engine(llama, max_batch, max_seq, graphs, compile):
    from llama_cli.engine import Engine

    llama.engine = None
    free()
    llama.engine = Engine(llama.model, max_batch, max_seq, cuda_graphs=graphs, compile=compile)


def quiet_stops(llama):
    import torch

    llama.tokenizer.stop_ids = frozenset()
    llama._stop = torch.tensor([-1], device=llama.device)


@section(lambda: 35 if QUICK else 115)  # 91 s on an H100 (fifteenth session), before short_buckets
def decode_rows(folder: Path, tok: str, wbytes: int, bw: float):
    """The decode table's llama-cli rows (eager, CUDA graphs, compiled + CUDA graphs; batch 1 and 16).
    Returns the model (the next parts reuse it)."""
    from llama_cli import Llama

    t = time.perf_counter()
    llama = Llama.build(str(folder), tok, PROMPT_LEN + NEW + 8, 16, cuda_graphs="off", compile="off",
                        dtype="bf16", device=DEV)
    RESULTS["notes"]["our_load_s"] = time.perf_counter() - t
    quiet_stops(llama)
    prompts = table_prompts()
    for n in (100, 100, 100):  # an eager prefill of one 100-token prompt (the continuous schedule's refill)
        sync()
        t = time.perf_counter()
        llama.engine.prefill([0], [(prompts[0] * 7)[:n]])
        sync()
        RESULTS["notes"]["prefill_100_tokens_ms"] = (time.perf_counter() - t) * 1e3
    say(f"eager prefill of a 100-token prompt: {RESULTS['notes']['prefill_100_tokens_ms']:.1f} ms")
    out = {}
    for impl, graphs, comp, new in (("llama-cli CUDA graphs", True, False, NEW),
                                    ("llama-cli eager (no graphs)", False, False, 64),
                                    ("llama-cli compiled + CUDA graphs", True, True, NEW))[:2 if QUICK else 3]:
        ours_engine(llama, 16, PROMPT_LEN + NEW + 8, graphs, comp)
        for b in (1, 16):
            ttft, rate = time_generate(lambda n: llama.generate(prompts[:b], max_gen_len=n, temperature=0), b, new,
                                       lambda: llama.engine)
            out[(impl, b)] = rate
            row(impl, b, rate, ttft, wbytes, bw, f"capture/compile {llama.engine.warmup_s:.1f} s")
            RESULTS["notes"]["bf16_b1_best"] = max(v for (i, bb), v in out.items() if bb == 1 and "graphs" in i)
    profile_step(llama)
    profile_step(llama, "step_profile_b16", 16)  # the batch-16 target: the products' rate at 16 rows, attention
    RESULTS["notes"]["bf16_graphs"] = {str(b): out[("llama-cli CUDA graphs", b)] for b in (1, 16)}
    short_buckets(llama, wbytes, bw)
    g1 = out[("llama-cli CUDA graphs", 1)]
    check("batch 1 CUDA graphs >= 85% of the copy-bandwidth ceiling", g1 * wbytes / bw >= 0.85,
          f"{g1:.1f} tok/s, {100 * g1 * wbytes / bw:.1f}%")
    if ("llama-cli compiled + CUDA graphs", 1) in out:
        c1 = out[("llama-cli compiled + CUDA graphs", 1)]
        check("batch 1 best (graphs or compiled + graphs) >= 85% of the ceiling", max(g1, c1) * wbytes / bw >= 0.85,
              f"{max(g1, c1):.1f} tok/s, {100 * max(g1, c1) * wbytes / bw:.1f}%")
    best16 = max(v for (i, b), v in out.items() if b == 16 and "graphs" in i)
    check("batch 16 >= 2,900 tok/s", best16 >= 2900, f"{best16:.0f} tok/s")
    check("eager (no graphs) beats Meta's reference (28.3 tok/s measured before)",
          out[("llama-cli eager (no graphs)", 1)] > 28.3, f"{out[('llama-cli eager (no graphs)', 1)]:.1f}")
    return llama


def candidate_rows(llama, impl: str, against: str, key: str, wbytes: int, bw: float):
    """A candidate's captured decode rows at batch 1 and 16 (the table's prompts and length) on llama's engine,
    each with its ratio to the plain captured row (decode_rows' notes, bf16_graphs) named `against`; kept in
    the notes as key_b1 and key_b16."""
    prompts, plain = table_prompts(), RESULTS["notes"].get("bf16_graphs", {})
    for b in (1, 16):
        ttft, rate = time_generate(lambda n: llama.generate(prompts[:b], max_gen_len=n, temperature=0), b, NEW,
                                   lambda: llama.engine)
        base = plain.get(str(b))
        row(impl, b, rate, ttft, wbytes, bw,
            f"capture {llama.engine.warmup_s:.1f} s" + (f"; {rate / base:.3f}x {against}" if base else ""))
        RESULTS["notes"][f"{key}_b{b}"] = rate


def short_buckets(llama, wbytes: int, bw: float):
    """The captured rows again with cache-length buckets from 64 positions instead of engine.MIN_BUCKET (256):
    a candidate for batch 16, where the table's steps (positions 16-271) read 256-320 positions of 16 rows'
    keys and values, ~2.2 GB a step against 13.5 of weights, ~1.6 GB from 64 (the live rows hold ~1.2)."""
    from llama_cli import engine

    saved = engine.MIN_BUCKET
    try:
        engine.MIN_BUCKET = 64
        ours_engine(llama, 16, PROMPT_LEN + NEW + 8, True, False)
        candidate_rows(llama, "llama-cli CUDA graphs, buckets from 64", "buckets from 256", "buckets_from_64", wbytes,
                       bw)
    finally:
        engine.MIN_BUCKET = saved


@section(100)
def fused_rows(folder: Path, tok: str, wbytes: int, bw: float):
    """model.FUSED_SMALL_OPS (triton_step.py: norms, residual adds, rotary with the cache writes, gated unit one
    kernel each) under CUDA graphs: first the logits of a prefill and of a decode step against the plain step's
    (bf16's error), then bf16 batch 1 and 16 and int4 g128 / int8 batch 1 beside the plain captured rows
    (decode_rows, quant_rows), and the profile of its eager step. Last in the call: a fault in a new kernel
    would leave the GPU unusable for the parts after it."""
    import torch

    from llama_cli import Llama, model as model_mod, triton_step

    if DRY and not triton_step.INTERPRETED:  # (a dry run with TRITON_INTERPRET=1 runs them on the CPU)
        return
    prompts = table_prompts()
    try:
        llama = Llama.build(str(folder), tok, PROMPT_LEN + NEW + 8, 16, cuda_graphs="off", compile="off",
                            dtype="bf16", device=DEV)
        quiet_stops(llama)

        def logits():
            ours_engine(llama, 16, PROMPT_LEN + NEW + 8, False, False)
            first = llama.engine.prefill(list(range(4)), prompts[:4]).float()
            step = llama.engine.decode(torch.tensor([5, 6, 7, 8], device=llama.device), [PROMPT_LEN] * 4).float()
            return first, step

        ref = logits()
        model_mod.FUSED_SMALL_OPS = True
        got = logits()
        for name, a, b in (("prefill", got[0], ref[0]), ("decode step", got[1], ref[1])):
            err = ((a - b).abs().max() / b.abs().max()).item()
            check(f"fused small ops (triton_step) == plain step, {name} logits (bf16 error)", err < 3e-2,
                  f"relative error {err:.2e}")
        ours_engine(llama, 16, PROMPT_LEN + NEW + 8, not DRY, False)
        candidate_rows(llama, "llama-cli CUDA graphs + fused small ops", "plain graphs", "fused_small_ops", wbytes, bw)
        profile_step(llama, "step_profile_fused_small_ops")
        llama = None
        free()
        for mode, group in (("int4", 128), ("int8", None)):
            llama, ttft, rate = quantized_b1(folder, tok, mode, group, "off", prompts[:1])
            base = RESULTS["notes"].get(f"{mode}_g{group}_CUDA graphs_b1")
            name = f"{mode}{f' g{group}' if group else ''}"
            row(f"llama-cli {name} CUDA graphs + fused small ops", 1, rate, ttft, wbytes, bw,
                f"capture {llama.engine.warmup_s:.1f} s" + (f"; {rate / base:.3f}x plain graphs" if base else ""))
            llama = None
            free()
    except Exception as e:  # noqa: BLE001 - a candidate: reported, the rest runs
        check("fused small ops run", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        model_mod.FUSED_SMALL_OPS = False
        llama = None
        free()


def profile_step(llama, key: str = "step_profile", rows: int = 1):
    """Where a decode step's GPU time goes (the eager step, which CUDA graphs replay; CUDA kernels by total
    time), for `rows` rows at the timed runs' middle position (attention reads about what it reads on average
    there): for the next round of work on the step. Kept in the notes under `key`."""
    if DRY:
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        ours_engine(llama, 16, PROMPT_LEN + NEW + 8, False, False)
        eng = llama.engine
        tok = torch.full((rows,), 5, device=llama.device)
        at = [PROMPT_LEN + NEW // 2] * rows
        for _ in range(3):
            eng.decode(tok, at)
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.decode(tok, at)
            sync()
        ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or
              getattr(e, "self_device_time_total", 0) > 0]
        total = sum(getattr(e, "self_device_time_total", 0) for e in ev)
        top = sorted(ev, key=lambda e: -getattr(e, "self_device_time_total", 0))[:12]
        RESULTS["notes"][key] = {
            "kernels": sum(e.count for e in ev), "gpu_us": total,
            "top": [[e.key[:80], e.count, round(getattr(e, "self_device_time_total", 0))] for e in top]}
        say(f"one eager {rows}-row step ({key}): {sum(e.count for e in ev)} kernels, {total / 1e3:.2f} ms of GPU time")
        for k, c, t in RESULTS["notes"][key]["top"]:
            say(f"  {t:8d} us {c:5d}x {k}")
    except Exception as e:  # noqa: BLE001 - a note, not a check
        say(f"(profile failed: {type(e).__name__}: {e})")


def table_prompts():
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 32000, (16, PROMPT_LEN), generator=g).tolist()


@section(60)
def seq_len_rows(llama):
    """max_seq_len 256 vs 4096: a decode step's cost follows the live tokens (CUDA graphs)."""
    prompts = table_prompts()
    new = 224
    rates = {}
    for seq in (256, 4096):
        ours_engine(llama, 16, seq, True, False)
        for b in (1, 16):
            _, rates[(seq, b, "static")] = time_generate(
                lambda n: llama.generate(prompts[:b], max_gen_len=n, temperature=0), b, new, lambda: llama.engine)
            rates[(seq, b, "continuous")] = continuous_rate(llama, prompts[:b], new)
            RESULTS["notes"]["seq_len_rates"] = {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in rates.items()}
            save()
    for b in (1, 16):
        for mode in ("static", "continuous"):
            r256, r4k = rates[(256, b, mode)], rates[(4096, b, mode)]
            check(f"max_seq_len 4096 decodes at >= 90% of 256 (batch {b}, {mode})", r4k >= 0.9 * r256,
                  f"{r4k:.1f} vs {r256:.1f} tok/s ({100 * r4k / r256:.0f}%)")


@section(240)
def b16_candidates(folder: Path, tok: str, wbytes: int, bw: float):
    """Batch 16 compiled + CUDA graphs with inductor's max-autotune (its Triton matrix-product templates
    timed against cuBLAS for each product shape) on top of the default options: the candidate for the
    batch-16 target, whose products cuBLAS streams at ~2/3 of the copy bandwidth. Runs only when named in
    --only (with decode_rows for the default's row beside it)."""
    from llama_cli import Llama, engine

    saved = engine.CUDA_COMPILE_OPTIONS
    try:
        engine.CUDA_COMPILE_OPTIONS = {**saved, "max_autotune": True}
        llama = Llama.build(str(folder), tok, PROMPT_LEN + NEW + 8, 16, cuda_graphs="auto" if DRY else "on",
                            compile="on", dtype="bf16", device=DEV)
        quiet_stops(llama)
        prompts = table_prompts()
        ttft, rate = time_generate(lambda n: llama.generate(prompts[:16], max_gen_len=n, temperature=0), 16, NEW,
                                   lambda: llama.engine)
        row("llama-cli compiled (max-autotune) + CUDA graphs", 16, rate, ttft, wbytes, bw,
            f"compile {llama.engine.warmup_s:.1f} s")
        RESULTS["notes"]["b16_max_autotune"] = rate
    finally:
        engine.CUDA_COMPILE_OPTIONS = saved
        llama = None
        free()


@section(80)  # three timed runs (~35 s) and the two breakdown runs again, on an H100
def batching_rows(llama):
    """Continuous vs static on 64 mixed prompts (the batching bench's workload), CUDA graphs."""
    from bench_batching import compare

    ours_engine(llama, 16, 200 + 256, True, False)
    res = compare(llama, n_prompts=64, seed=0, keep=True, where=True, settled=True)
    reqs, a, b = res.pop("requests"), res.pop("static_out"), res.pop("continuous_out")
    RESULTS["notes"]["batching"] = res
    say(f"continuous launching each step ahead (the default) {res['continuous_tok_s']:.0f} tok/s, settling each "
        f"step first {res['continuous_settled_tok_s']:.0f}; static {res['static_tok_s']:.0f}")
    for name in ("static", "continuous"):  # the host time between steps is what the GPU idles through
        w = res[f"{name}_where"]
        say(f"{name}: decode steps {w['decode_s']:.2f} s, prefills {w['prefill_s']:.2f} s, everything else "
            f"{w['other_s']:.2f} s of {w['total_s']:.2f} s (device synchronized after each engine call)")
    check("continuous >= 2x static on 64 mixed prompts (7B shape, batch 16)", res["ratio"] >= 2.0,
          f"{res['ratio']:.2f}x ({res['static_tok_s']:.0f} -> {res['continuous_tok_s']:.0f} tok/s), "
          f"identical {res['identical']}/{res['prompts']}")
    # where the two schedules' greedy tokens part (bf16: batch composition changes the kernels' rounding),
    # the two tokens must be a near-tie of the logits of the prompt run alone up to that point
    parting(llama, reqs, a, b, "bf16", 1e-2)


def parting(llama, reqs, a, b, name, tol):
    """Check that where two runs' greedy tokens part, the two tokens are a near-tie (within tol of the logit
    scale) of the logits of the prompt run alone up to there."""
    import torch

    from helpers import near_tie_gap

    gaps, first = [], []
    for r in reqs:
        x, y = a[r.index], b[r.index]
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if k is None:
            continue
        ids = llama.tokenizer.encode(r.prompt, bos=True, eos=False) + x[:k]
        with torch.no_grad():
            logits = llama.engine.prefill([0], [ids], all_logits=True)[0][-1].float()
        gaps.append(near_tie_gap(logits, x[k], y[k]))
        first.append(k)
    RESULTS["notes"][f"batching_parting_{name}"] = {"gaps": gaps, "first_differing_token": first}
    check(f"static and continuous greedy agree up to near-ties ({name})", not gaps or max(gaps) <= tol,
          f"{len(gaps)} of {len(reqs)} part; largest gap {max(gaps, default=0):.2e} of the logit scale; first "
          f"parting token median {sorted(first)[len(first) // 2] if first else '-'}")


@section(60)
def batching_fp32(folder: Path, tok: str):
    """The same comparison in fp32 (32 prompts): the schedules must agree up to near-ties of 1e-3, the CPU
    tests' rule (bf16 rounding, which flips ties above, is out of the picture)."""
    from bench_batching import compare

    from llama_cli import Llama

    llama = Llama.build(str(folder), tok, 200 + 256, 16, dtype="fp32", device=DEV, compile="off")
    res = compare(llama, n_prompts=32, seed=1, keep=True)
    reqs, a, b = res.pop("requests"), res.pop("static_out"), res.pop("continuous_out")
    RESULTS["notes"]["batching_fp32"] = res
    say(f"fp32: continuous {res['ratio']:.2f}x static, identical {res['identical']}/{res['prompts']}")
    parting(llama, reqs, a, b, "fp32", 1e-3)
    llama = None
    free()


def continuous_rate(llama, prompts, new):
    """Decode tok/s of the continuous schedule on token-id prompts (all the same max_gen_len)."""
    from llama_cli.prompts import PromptRequest
    from llama_cli.scheduler import Options, run_continuous
    from llama_cli.settings import Settings

    text = [llama.tokenizer.decode(p) for p in prompts]

    def go(n):
        reqs = [PromptRequest(i, t, Settings(max_gen_len=n, temperature=0.0)) for i, t in enumerate(text)]
        run_continuous(llama, reqs, Options(), lambda r: None)

    _, rate = time_generate(go, len(prompts), new, lambda: llama.engine)
    return rate


@section(40)
def hf_rows(params, w, wbytes, bw):
    import torch

    from helpers import to_hf

    model = to_hf(params, w, 32000, max_positions=4096, device=DEV, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (16, PROMPT_LEN), generator=g).to(DEV)
    for b in (1, 16):
        def run(n):
            with torch.inference_mode():
                model.generate(ids[:b], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        ttft, rate = time_generate(run, b, 64)
        row("HF transformers eager bf16 (64 tokens)", b, rate, ttft, wbytes, bw)
    model = None
    free()


META_BENCH = r'''
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29544", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from llama import Llama
t = time.time()
llama = Llama.build(ckpt_dir=sys.argv[2], tokenizer_path=sys.argv[3], max_seq_len=16 + 256 + 8, max_batch_size=16)
load = time.time() - t
llama.tokenizer.eos_id = -5  # never stop early: every run makes all its tokens
g = torch.Generator(device="cpu").manual_seed(1)
prompts = torch.randint(3, 32000, (16, 16), generator=g, device="cpu").tolist()
out = {"load_s": load}
for b in (1, 16):
    def run(n):
        llama.generate(prompts[:b], max_gen_len=n, temperature=0)
        torch.cuda.synchronize()
    run(256)
    t = time.perf_counter(); run(1); ttft = time.perf_counter() - t
    t = time.perf_counter(); run(256); total = time.perf_counter() - t
    out[b] = (ttft, b * 255 / (total - ttft))
print("META" + json.dumps(out))
'''


@section(90)
def meta_rows(folder: Path, tok: str, meta: str, wbytes: int, bw: float):
    left = max(30, BUDGET - (time.perf_counter() - START))
    proc = subprocess.run([sys.executable, "-c", META_BENCH, meta, str(folder), tok], capture_output=True, text=True,
                          timeout=min(300, left))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("META")), None)
    if line is None:
        raise RuntimeError(f"Meta's reference did not run: {proc.stderr[-1500:]}")
    res = json.loads(line[4:])
    RESULTS["notes"]["meta_load_s"] = res["load_s"]
    for b in ("1", "16"):
        row("Meta reference (fp16, its loop)", int(b), res[b][1], res[b][0], wbytes, bw)


@section(30)
def cold_cli(folder: Path, tok: str):
    cmd = [sys.executable, "-m", "llama_cli", "--ckpt_dir", str(folder), "--tokenizer_path", tok, "--prompt",
           "The capital of France is", "--max_gen_len", "256", "--temperature", "0", "--output", "jsonl"]
    if DRY:
        cmd += ["--dtype", "bf16"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], cwd=REPO, capture_output=True)
    RESULTS["notes"]["import_torch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, llama_cli.cli, llama_cli.generation; "
                          "torch.zeros(1, device='cuda')"], cwd=REPO, capture_output=True)
    RESULTS["notes"]["import_and_cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for ln in p.stderr:
        lines.append(f"[{time.perf_counter() - t:6.2f} s] {ln.rstrip()}")
    p.wait(timeout=300)
    wall = time.perf_counter() - t
    lines.append(f"[{wall:6.2f} s] exit {p.returncode}")
    say(f"cold CLI (python -c 'import torch' took {RESULTS['notes']['import_torch_s']:.2f} s, "
        "python -c 'import torch, llama_cli...; cuda init' "
        f"{RESULTS['notes']['import_and_cuda_init_s']:.2f} s):\n  " + "\n  ".join(lines[-6:]))

    class proc:  # noqa: N801 - what the code below reads
        returncode, stderr = p.returncode, "\n".join(lines)
    summary = [ln for ln in proc.stderr.splitlines() if "tokens in" in ln]
    if proc.returncode != 0 or not summary:
        raise RuntimeError(proc.stderr[-1500:])
    import re

    m = re.search(r"tokens in ([\d.]+) s.*?(?:compiling/capturing the decode step ([\d.]+) s.*?)?model load ([\d.]+) s",
                  summary[0])
    gen, capture, load = float(m.group(1)), float(m.group(2) or 0), float(m.group(3))
    RESULTS["notes"]["cold_cli"] = {"wall_s": wall, "load_s": load, "generate_s": gen, "capture_s": capture,
                                    "summary": summary[0]}
    check("one-prompt command within load + 5 s + generation", wall <= load + 5 + (gen - capture),
          f"wall {wall:.1f} s; load {load:.1f} s, generation {gen - capture:.1f} s, capture {capture:.1f} s")


def free():
    gc.collect()
    if not DRY:
        import torch

        torch.cuda.empty_cache()


def main() -> int:
    global OUT_DIR, BUDGET, ONLY, QUICK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meta", default=None, help="folder holding Meta's llama package (llama/model.py, ...)")
    ap.add_argument("--tokenizer", default=None, help="a 32000-token SentencePiece tokenizer.model (Llama 2's)")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json, written after every check and row")
    ap.add_argument("--budget", type=float, default=540,
                    help="seconds for the whole run: a part that would not fit is skipped (SKIP line)")
    ap.add_argument("--skip_7b", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated parts to run (nccl, tiny_agreement, "
                    "tiny_quantized, tiny_batching, decode_rows, quant_rows, cold_cli, seq_len_rows, batching_rows, "
                    "batching_fp32, hf_rows, quant_candidates, fused_rows, meta_rows); default all of these; "
                    "b16_candidates runs only when named")
    ap.add_argument("--quick", action="store_true",
                    help="no compiled rows in the decode table; of the quantized rows int8 and int4 g32 captured, "
                    "after the "
                    "reference rows; the tiny quantized check (int8 only) last")
    a = ap.parse_args()
    BUDGET, QUICK = a.budget, a.quick
    ONLY = set(a.only.split(",")) if a.only else None
    if a.out:
        OUT_DIR = Path(a.out)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available() and not DRY:
        print("no CUDA GPU here: nothing to check")
        return 0
    say(f"device: {torch.cuda.get_device_name() if not DRY else 'CPU (dry run)'}; torch {torch.__version__}")
    RESULTS["device"] = torch.cuda.get_device_name() if not DRY else "CPU (dry run)"
    # the 7B checkpoint in memory where there is room (13.5 GB): a fresh machine's page cache holds it anyway
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and not DRY and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 20e9 else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        tmp = Path(tmp)
        if not DRY and not QUICK:  # correctness first (--quick: last)
            nccl()
            with untuned():
                tiny_agreement(tmp)
                tiny_quantized(tmp)
        if not QUICK:
            tiny_batching(tmp)
        if not a.skip_7b:
            from llama_cli.memory import weight_bytes
            from helpers import model_args

            tok = a.tokenizer
            if tok is None or not os.path.isfile(tok):
                raise SystemExit("--tokenizer (Llama 2's tokenizer.model, 32000 tokens) is needed for the 7B part")
            folder = tmp / "7b"
            params, w = make_7b(folder)
            wbytes = weight_bytes(model_args(params, 32000), 1, torch.bfloat16)
            bw = copy_bandwidth()
            RESULTS["notes"]["copy_bw_GBs"] = bw / 1e9
            RESULTS["notes"]["weights_GB"] = wbytes / 1e9
            say(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write); weights {wbytes / 1e9:.2f} GB -> ceiling "
                f"{bw / wbytes:.1f} tok/s at batch 1 [{time.perf_counter() - START:.0f} s]")
            say("| impl | batch | tok/s | % of ceiling | TTFT ms | |")
            say("|---|---|---|---|---|---|")
            llama = decode_rows(folder, tok, wbytes, bw)
            if QUICK:  # a second look: the changed parts first, the costly ones last
                cold_cli(folder, tok)
                if llama is not None:
                    batching_rows(llama)
                    llama = None
                    free()
                if not DRY:
                    with untuned():
                        tiny_quantized(tmp)
                quant_rows(folder, tok, wbytes, bw)
            else:
                quant_rows(folder, tok, wbytes, bw)
                cold_cli(folder, tok)
                if llama is not None:
                    seq_len_rows(llama)
                    batching_rows(llama)
                    llama = None
                    free()
                batching_fp32(folder, tok)
                hf_rows(params, w, wbytes, bw)
                quant_candidates(tmp, folder, tok, wbytes, bw)
                if ONLY is not None:  # named only
                    b16_candidates(folder, tok, wbytes, bw)
                fused_rows(folder, tok, wbytes, bw)  # last: new kernels
            del w
            if a.meta and not DRY:
                meta_rows(folder, tok, a.meta, wbytes, bw)
    say(f"done in {time.perf_counter() - START:.0f} s; {FAILURES} failure(s)")
    save()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
