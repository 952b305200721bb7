#!/usr/bin/env bash
# Installs pixart-tune (editable) and its dependencies into the project's Python
# environment: the one you have activated, else the checkout's .venv (see env.sh).
# Usage: scripts/install.sh [extra]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
extra=${1:-}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # No torch yet: install the pinned release before anything else, so that no
  # dependency pulls whichever torch build it likes. A CUDA user who installed
  # their own torch first keeps it (pyproject asks only for torch>=2.4). Without an
  # NVIDIA GPU, the CPU build: PyPI's Linux wheel bundles gigabytes of CUDA.
  echo "installing torch 2.13.0 into $(dirname "$(dirname "$PY")")"
  if ! command -v nvidia-smi >/dev/null 2>&1 &&
     "$PY" -m pip install --quiet --retries 1 --timeout 30 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
    :
  else
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
fi
echo "installing pixart-tune${extra:+[$extra]} and its dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra:+[$extra]}"
