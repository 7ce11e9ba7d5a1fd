#!/usr/bin/env bash
# The GPU call (scripts/gpu_check.py) on a lent machine that has torch with CUDA and transformers but no
# internet, no fairscale and no fire. Two halves:
#   bash scripts/gpu_call.sh prepare          # here, with the package registries: the wheels into .whl/,
#                                             # Meta's Llama 2 tokenizer into .bench/ (both git-ignored)
#   bash scripts/gpu_call.sh run OUT [FLAGS]  # there, with .whl and .bench carried: installs the wheels
#                                             # into /tmp/site and runs gpu_check.py --out OUT FLAGS
# FLAGS default to the focused call in docs/benchmarks.md (--budget 540 --only decode_rows,quant_rows,
# batching_fp32,fused_rows: the bf16 and quantized rates side by side, then with the fused small ops, ~8.5
# minutes by the parts' estimates (made on an H100 in the fifteenth session), so give the call a limit of ~590 s:
# a part that would not fit the budget is skipped, and results are written after every row); the log goes
# to OUT/gpu_check.log as well.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    mkdir -p .whl .bench
    grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo /.bench/ >> .git/info/exclude
    python3 -m pip wheel -q --no-deps fairscale==0.4.13 -w .whl
    python3 -m pip download -q --no-deps fire termcolor -d .whl
    if [ ! -f .bench/llama2-tokenizer.model ] && [ -f ../shared/fixtures/llama2-tokenizer.model ]; then
      cp ../shared/fixtures/llama2-tokenizer.model .bench/
    fi
    ls -l .whl .bench
    ;;
  run)
    out=${2:?usage: bash scripts/gpu_call.sh run OUT [gpu_check flags]}
    shift 2
    [ "$#" -gt 0 ] || set -- --budget 540 --only decode_rows,quant_rows,batching_fp32,fused_rows
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    tok=()
    [ -f .bench/llama2-tokenizer.model ] && tok=(--tokenizer .bench/llama2-tokenizer.model)
    meta=()
    [ -d .bench/meta ] && meta=(--meta .bench/meta)
    mkdir -p "$out"
    python3 scripts/gpu_check.py "${tok[@]}" "${meta[@]}" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log" | grep -v Warning
    ;;
  *)
    echo "usage: bash scripts/gpu_call.sh prepare | run OUT [gpu_check flags]" >&2
    exit 2
    ;;
esac
