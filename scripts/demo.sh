#!/usr/bin/env bash
# End to end on the embedded default, no download: build the tiny PixArt-Sigma
# pipeline, prepare the bundled sample photos, train a LoRA on them, sample with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
out=${1:-work/demo}
mkdir -p "$out"
[ -f "$out/tiny/model_index.json" ] || pixart-tune init-tiny "$out/tiny"
pixart-tune prepare datasets/samples --out "$out/data" --model "$out/tiny" --resolution 256
echo "demo finished: see $out"
