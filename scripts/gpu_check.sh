#!/usr/bin/env bash
# One short device run for the GPU hot path (issue 13): writes one JSON, at most 10 minutes.
#   scripts/gpu_check.sh [OUT.json] [bench/gpu_check.py options, e.g. --export DIR --target DIR]
# On a machine without CUDA it runs a tiny CPU smoke test of every section, says in the JSON
# what it skipped, and exits 0. Interpreter: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # section lines as they finish, also when a timeout cuts the run
out="${1:-gpu_check.json}"
[ $# -gt 0 ] && shift
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    printf '{"status": "skipped: %s cannot import torch", "sections": {}}\n' "$py" > "$out"
    echo "gpu_check: $py cannot import torch (set PYTHON, or run scripts/dev.sh setup)" >&2
    exit 2
fi
# 480 s of sections (none starts without the time it needs), a hard stop at 590 s
exec timeout --kill-after=10 590 "$py" bench/gpu_check.py --out "$out" --budget-s 480 "$@"
