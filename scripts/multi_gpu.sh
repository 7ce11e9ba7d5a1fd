#!/usr/bin/env bash
# Model-parallel completion over N GPUs of one machine (any shard count: shards are merged or split at load).
#   NPROC=2 bash scripts/multi_gpu.sh CKPT_DIR "Your prompt"
# Several machines: run on each, with the same --rdzv_endpoint (the first machine's address) and NNODES:
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:29500 NPROC=8 bash scripts/multi_gpu.sh CKPT_DIR "Your prompt"
set -euo pipefail
# after scripts/quickstart.sh, llama-cli lives in the repository's .venv: use it when none is on PATH
command -v llama-cli >/dev/null || PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
CKPT=${1:?usage: multi_gpu.sh CKPT_DIR PROMPT}
PROMPT=${2:?usage: multi_gpu.sh CKPT_DIR PROMPT}
NPROC=${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
if [ -n "${MASTER:-}" ]; then
  LAUNCH=(--nnodes "${NNODES:-2}" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d --rdzv_endpoint "$MASTER"
          --rdzv_id "${RDZV_ID:-llama-cli}")
else
  LAUNCH=(--standalone)
fi
exec torchrun "${LAUNCH[@]}" --nproc_per_node "$NPROC" -m llama_cli --ckpt_dir "$CKPT" --prompt "$PROMPT" \
  --temperature "${TEMPERATURE:-0}" --max_gen_len "${MAX_GEN_LEN:-128}"
