#!/usr/bin/env bash
# Installs pixart-tune (editable) and its dependencies into the current Python.
# Usage: scripts/install.sh [extra]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # No torch yet: install the pinned release before anything else, so that no
  # dependency pulls whichever torch build it likes. A CUDA user who installed
  # their own torch first keeps it (pyproject asks only for torch>=2.4). Without an
  # NVIDIA GPU, the CPU build: PyPI's Linux wheel bundles gigabytes of CUDA.
  if ! command -v nvidia-smi >/dev/null 2>&1 &&
     "$PY" -m pip install --quiet --retries 1 --timeout 30 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; then
    :
  else
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PY" -m pip install --quiet -e ".${extra:+[$extra]}"
