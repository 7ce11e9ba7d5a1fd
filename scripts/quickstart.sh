#!/usr/bin/env bash
# Set up llama-cli on a fresh machine and complete a prompt.
# Without a model of your own, it makes a small RANDOM checkpoint (gibberish output) to show the flow;
# pass a real Meta checkpoint folder to get real text:  bash scripts/quickstart.sh path/to/llama-2-7b
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0   # first, pinned: see README
python -m pip install -q -e .
CKPT=${1:-checkpoints/random-tiny}
if [ -z "${1:-}" ] && [ ! -f "$CKPT/params.json" ]; then
  python scripts/make_random_checkpoint.py --out "$CKPT"
fi
llama-cli --ckpt_dir "$CKPT" --prompt "${PROMPT:-The capital of France is}" --temperature 0 --max_gen_len 32
