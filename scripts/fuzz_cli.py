"""Bad and odd command lines against every llama-cli command, for as long as asked.

    python scripts/fuzz_cli.py [--seconds 300 | --trials N] [--seed 0] [--jobs 2]

Each trial takes a working command (generation, chat, perplexity, quantize, reshard, convert on a tiny random
checkpoint) and gives one to three of its flags a value drawn from odd ones (empty, negative, huge, nan,
inf, words, lists, missing paths, folders, empty or binary files, other checkpoints) or from the flag's
accepted ones, then runs it. Whatever the values, the run must end as the README promises: exit 0, 1 or 2, no
Python traceback, and a failure told in one `llama-cli: error: ...` line. A failure that the catch-all
reported with a Python exception's name (`error: TypeError: ...`) is a mistake the tool did not recognise:
printed too. Exits 1 when anything was found. (Found on its first runs: --top_k 2**64, a static --max_gen_len
of 10**26, --temperature or --repetition_penalty of 1e308 or 1e-320 failing inside the sampler; a flag's value
"--" handing the rest of the line to fire; a model file taken as a prompts file; a --prompt with bytes that are
not UTF-8, or a lone \\uD800 escape in a JSONL prompt, failing in the tokenizer.)
"""

import argparse
import inspect
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ODD = ["", "-1", "0", "abc", "nan", "inf", "-inf", "1e309", "18446744073709551616", "[1, 2]", "{'a': 1}",
       "None", "True", "caf\u00e9 \u2713", "0x10", " 2 ", "1_0", "-", "--", "2.5", "-0.0", "1e-320",
       "ab\udcffc"]  # the last: the byte 0xff, not UTF-8 (subprocess passes it as os.fsencode does)
GOOD = {"dtype": ["fp32", "bf16", "fp16", "fp8", "float32"], "device": ["cpu", "cuda", "mps", "cuda:1", "cpu:0"],
        "kv_cache_dtype": ["auto", "fp32", "bf16", "fp16", "int8"], "output": ["text", "jsonl", "json"],
        "schedule": ["continuous", "static", "paged"], "compile": ["auto", "off", "maybe"],
        "cuda_graphs": ["auto", "off", "on"], "quantize": ["int8", "int4", "int2", "none"],
        "mode": ["int8", "int4", "q4_0"], "group_size": ["32", "64", "128", "48", "0"],
        "chat_format": ["auto", "llama2", "llama3", "template", "chatml"], "shards": ["1", "2", "3", "4", "16"],
        "ctx": ["8", "16", "33", "64", "100000"], "stride": ["1", "8", "16", "64"],
        "threads": ["1", "2", "3", "0", "1000000000", "1.5"]}
INTS = ["1", "2", "3", "7", "16", "64", "4096", "1000000000", "-5"]
FLOATS = ["0", "0.5", "1", "1.3", "2", "1e-9", "100", "-0.5"]
EXCEPTION_NAMED = re.compile(r"llama-cli: error: [A-Z]\w*(Error|Exception|Warning)\b")


class Files:
    """The checkpoints and files the commands draw on, made once."""

    def __init__(self, root: Path):
        import torch

        from helpers import TINY, make_model_folder, train_sentencepiece

        self.root = root
        spm = train_sentencepiece(root / "spm.model")
        self.model = make_model_folder(root / "model", spm, TINY)[0]
        self.two = make_model_folder(root / "two", spm, TINY, n_shards=2, dtype=torch.bfloat16)[0]
        subprocess.run([sys.executable, "-m", "llama_cli", "quantize", "--ckpt_dir", str(self.model), "--out",
                        str(root / "q"), "--mode", "int4", "--group_size", "32"], check=True, capture_output=True)
        self.quantized = root / "q"
        (root / "empty.txt").write_text("")
        (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
        (root / "text.txt").write_text("the cat sat on the mat\nonce upon a time\n" * 30)
        (root / "bad.jsonl").write_text('{"prompt": "hi", "max_gen_len": "x"}\n{"prompt": 5}\nnot json\n')
        (root / "good.jsonl").write_text("".join(json.dumps({"prompt": p, "max_gen_len": 3}) + "\n"
                                                 for p in ("the cat", "a dog", "one")))
        (root / "surrogate.jsonl").write_text('{"prompt": "a", "stop": ["\\udc80"]}\n{"prompt": "\\ud800 b"}\n')
        (root / "fake.gguf").write_bytes(b"GGUF" + bytes(60))
        (root / "folder").mkdir()
        self.paths = [str(root / n) for n in ("missing", "folder", "empty.txt", "binary.bin", "text.txt",
                                              "bad.jsonl", "good.jsonl", "surrogate.jsonl", "fake.gguf")]
        # a path that cannot be made, even by root: below a regular file (an absolute path such as
        # /nonexistent/dir was made by runs as root, outside the fuzzer's folder)
        self.paths += [str(self.model), str(self.two), str(self.quantized), str(root / "text.txt" / "dir" / "file")]


def base_command(rng: random.Random, f: Files, out: Path) -> tuple[list[str], dict, str]:
    """A command that works as it is: (its subcommand words, its flags, standard input)."""
    kind = rng.choice(["main"] * 4 + ["chat", "perplexity", "quantize", "reshard", "convert"])
    ckpt = str(rng.choice([f.model, f.model, f.two, f.quantized]))
    if kind == "main":
        flags = {"ckpt_dir": ckpt, "max_gen_len": "3", "max_seq_len": "64", "temperature": "0"}
        flags.update(rng.choice([{"prompt": "the cat"}, {"prompts_file": str(f.root / "good.jsonl")}, {}]))
        return [], flags, "the dog\n"
    if kind == "chat":
        return ["chat"], {"ckpt_dir": ckpt, "max_gen_len": "3", "max_seq_len": "64"}, "hello\n"
    if kind == "perplexity":
        return ["perplexity"], {"ckpt_dir": ckpt, "text_file": str(f.root / "text.txt"), "ctx": "32"}, ""
    if kind == "quantize":
        return ["quantize"], {"ckpt_dir": str(rng.choice([f.model, f.two])), "out": str(out), "mode": "int8"}, ""
    if kind == "reshard":
        return ["reshard"], {"ckpt_dir": ckpt, "out": str(out), "shards": "2"}, ""
    return ["convert"], {"src": str(f.root / "fake.gguf"), "out": str(out)}, ""


def flags_of(words: list[str]) -> dict:
    """The flag names a command takes, each with its default."""
    from llama_cli.cli import _subcommands
    from llama_cli.config import RunConfig

    fn = _subcommands()[words[0]][0] if words else RunConfig
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n not in ("debug", "compile")}


def odd_value(rng: random.Random, name: str, default, f: Files) -> str:
    pools = [ODD, f.paths]
    if name in GOOD:
        pools.append(GOOD[name])
    elif isinstance(default, bool):
        pools.append(["true", "false", "1", "yes"])
    elif isinstance(default, int):
        pools.append(INTS)
    elif isinstance(default, float):
        pools.append(FLOATS)
    return rng.choice(rng.choice(pools))


def trial(rng: random.Random, f: Files, n: int) -> list[str]:
    """One random command; what it did wrong, as lines."""
    from helpers import subprocess_env

    out = f.root / f"out{n}"
    words, flags, stdin = base_command(rng, f, out)
    known = flags_of(words)
    for name in rng.sample(sorted(known), k=rng.randint(1, 3)):
        flags[name] = odd_value(rng, name, known[name], f)
    if flags.get("output_file"):
        flags["output_file"] = rng.choice([str(f.root / f"res{n}.jsonl"), flags["output_file"]])
    argv = list(words)
    for name, value in flags.items():
        if isinstance(known.get(name), bool) and value in ("true", "false", "1", "yes"):
            argv.append(f"--{name}" if value != "false" else f"--no{name}")
        elif rng.random() < 0.2:
            argv.append(f"--{name}={value}")
        else:
            argv += [f"--{name}", value]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "llama_cli", *argv], input=stdin, capture_output=True, text=True,
                           env=env, timeout=180, cwd=f.root)
    except subprocess.TimeoutExpired:
        return [f"no end within 180 s: llama-cli {' '.join(map(repr, argv))}"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    said = p.stderr.strip().splitlines()
    errors = [line for line in said if line.startswith("llama-cli: error:")]
    wrong = []
    if p.returncode not in (0, 1, 2):
        wrong.append(f"exit {p.returncode}")
    if "Traceback" in p.stderr:
        wrong.append("a traceback")
    if any(EXCEPTION_NAMED.match(line) for line in errors):
        wrong.append("an unrecognised exception")
    # prompts (or chat's messages) too long for --max_seq_len: error entries, then a closing line
    entries = p.returncode == 1 and any(re.search(r"\d+ of \d+ \w+(\(s\))? could not run", line) for line in said)
    if p.returncode != 0 and not errors and not entries:  # (prompts too long for --max_seq_len: error entries)
        wrong.append("no error line")
    if len(errors) > 1:
        wrong.append(f"{len(errors)} error lines")
    if not wrong:
        return []
    return [f"{', '.join(wrong)}: llama-cli {' '.join(map(repr, argv))}\n  " + "\n  ".join(said[-3:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--trials", type=int, default=0, help="run exactly this many trials instead (reproducible)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llama-cli-fuzz-cli-"))
    try:
        files = Files(root)
        rng, found, n, start = random.Random(a.seed), [], 0, time.monotonic()
        with ThreadPoolExecutor(a.jobs) as pool:
            while (n < a.trials) if a.trials else (time.monotonic() - start < a.seconds):
                batch = [random.Random(rng.randrange(1 << 30)) for _ in range(a.jobs)]
                for lines in pool.map(lambda x: trial(x[1], files, n + x[0]), enumerate(batch)):
                    for line in lines:
                        print(line, flush=True)
                    found += lines
                n += len(batch)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{n} commands; {len(found)} went wrong")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
