#!/usr/bin/env bash
# Run a prompt file (.txt: one prompt per line; .jsonl: {"prompt": ..., "id": ...}) into a JSONL file.
# Safe to kill and re-run: --resume skips prompts already in the output file.
#   bash scripts/batch_file.sh CKPT_DIR prompts.jsonl results.jsonl
set -euo pipefail
# after scripts/quickstart.sh, llama-cli lives in the repository's .venv: use it when none is on PATH
command -v llama-cli >/dev/null || PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
CKPT=${1:?usage: batch_file.sh CKPT_DIR PROMPTS_FILE OUTPUT_FILE}
PROMPTS=${2:?usage: batch_file.sh CKPT_DIR PROMPTS_FILE OUTPUT_FILE}
OUT=${3:?usage: batch_file.sh CKPT_DIR PROMPTS_FILE OUTPUT_FILE}
exec llama-cli --ckpt_dir "$CKPT" --prompts_file "$PROMPTS" --output jsonl --output_file "$OUT" --resume \
  --max_batch_size "${MAX_BATCH_SIZE:-16}" --max_seq_len "${MAX_SEQ_LEN:-1024}" --max_gen_len "${MAX_GEN_LEN:-256}" \
  --temperature "${TEMPERATURE:-0.6}" > /dev/null
