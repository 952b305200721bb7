#!/usr/bin/env bash
# Installs pixart-tune with its test tools and runs the whole test suite, in the
# project's Python environment (the activated one, else the checkout's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
. scripts/env.sh

# The app's browser test drives the system Chromium (no browser download).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium could not be installed; browser tests will be skipped"
fi
exec "$PY" -m pytest "$@"
