#!/usr/bin/env bash
# End to end on the embedded default, no download: build the tiny PixArt-Sigma
# pipeline, prepare the bundled sample photos, train a LoRA on them, and sample a
# base-vs-adapter comparison grid with it. Everything lands in work/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. scripts/env.sh  # the environment install.sh used: its pixart-tune
out=${1:-work/demo}
mkdir -p "$out"
[ -f "$out/tiny/model_index.json" ] || pixart-tune init-tiny "$out/tiny"
pixart-tune prepare datasets/samples --out "$out/data" --model "$out/tiny" --resolution 256 --trigger "sks"
rm -rf "$out/run"  # the demo's own previous run; a real run would --resume instead
pixart-tune train recipes/tiny_cpu.yaml model="$out/tiny" data.path="$out/data" output_dir="$out/run"
pixart-tune sample --model "$out/tiny" --adapter "$out/run/adapter" --prompt "sks, a photo of a cat" \
    --seeds 1 2 3 --steps 10 --sweep 0.5,1 --out "$out/samples"
echo
echo "demo finished: prepared data in $out/data (report.json), run in $out/run (loss curve: loss.png),"
echo "samples in $out/samples/grid.png (rows: base, adapter x0.5, adapter x1)"
