#!/usr/bin/env bash
# Runs every benchmark in bench/, one after the other, and ends with their one-line figures.
#
#   bash bench/run_all.sh [RESULTS_DIR]      # default RESULTS_DIR: bench/results
#
# Each benchmark's full output (its markdown table and final figure) is also written
# to RESULTS_DIR/<name>.txt. Measured: 4 min 23 s on an idle 2-core machine, 22 min
# at load average 2.5-4.4; run it on an otherwise idle machine, since other work on
# the cores moves the timings (and the ratios). The GPU check runs
# in full when PyTorch sees a CUDA device (report in RESULTS_DIR/gpu_check.md);
# without one it runs its --tiny mode, which checks its code path only.
set -uo pipefail

cd "$(dirname "$0")/.."
results="${1:-bench/results}"
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

failed=()
run() {
  local name="$1"; shift
  if [[ ! -f "bench/$name.py" ]]; then
    echo "== $name: bench/$name.py is not there, skipped"
    return
  fi
  echo "== $name: python bench/$name.py $*"
  if ! python "bench/$name.py" "$@" 2>"$results/$name.log" | tee "$results/$name.txt"; then
    echo "!! $name failed; its log: $results/$name.log"
    failed+=("$name")
  fi
  echo
}

run trainer_overhead
run prepare_throughput
run cache_reuse
run realsize_memory
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  run gpu_check --out "$results/gpu_check.md"
else
  run gpu_check --tiny --out "$results/gpu_check_tiny.md"
fi

echo "== figures"
for name in trainer_overhead prepare_throughput cache_reuse realsize_memory gpu_check; do
  [[ -f "$results/$name.txt" ]] && tail -n 1 "$results/$name.txt"
done
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
