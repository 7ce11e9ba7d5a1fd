#!/usr/bin/env bash
# Complete one prompt (greedy), printing the completion as it is generated.
#   bash scripts/one_prompt.sh CKPT_DIR "Your prompt"
set -euo pipefail
# after scripts/quickstart.sh, llama-cli lives in the repository's .venv: use it when none is on PATH
command -v llama-cli >/dev/null || PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
CKPT=${1:?usage: one_prompt.sh CKPT_DIR PROMPT}
PROMPT=${2:?usage: one_prompt.sh CKPT_DIR PROMPT}
exec llama-cli --ckpt_dir "$CKPT" --prompt "$PROMPT" --temperature 0 --max_gen_len "${MAX_GEN_LEN:-128}" --stream
