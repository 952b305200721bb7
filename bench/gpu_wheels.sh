#!/usr/bin/env bash
# Downloads the GPU check's wheel set (bench/gpu_wheels.txt; torch is not in it) for
# a Linux x86_64 machine with CPython PYTHON_VERSION, on any machine with network.
# Copy DEST and the repository to the GPU machine; docs/benchmarks.md, section 5,
# gives the install and run commands.
#
# Usage: bash bench/gpu_wheels.sh [DEST] [PYTHON_VERSION]     defaults: .whl 3.12
#   BNB_CUDA="130 132"  CUDA builds of bitsandbytes' kernels kept (torch.version.cuda
#                       13.0 -> 130); the others are stripped from its 41 MiB wheel.
#                       BNB_CUDA=all keeps every one.
#   FULL=1              also the "#left-out" packages (pip check clean, ~9 MiB more).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pyver=${2:-3.12}
py=${PYTHON:-python3}
mkdir -p "$dest"
# manylinux_2_28 at newest: glibc 2.28 (2018) or later on the GPU machine.
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64
           --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
failed=()
while read -r line; do
  case $line in
    "#left-out "*) [ "${FULL:-0}" = 1 ] || continue; line=${line#\#left-out } ;;
  esac
  spec=${line%%#*}; spec=${spec//[[:space:]]/}
  [ -n "$spec" ] || continue
  # One pip call a package: a missing wheel names its package instead of stopping the rest.
  if ! "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
       --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$dest" "$spec" 2>/dev/null; then
    failed+=("$spec")
  fi
done < bench/gpu_wheels.txt

if [ "${BNB_CUDA:-130 132}" != all ]; then
  # A wheel is a zip: drop the kernel libraries of other CUDA/ROCm/XPU builds and
  # their RECORD lines, keep the CPU one (what bitsandbytes loads without a GPU).
  "$py" - "$dest" ${BNB_CUDA:-130 132} <<'PY'
import pathlib, re, sys, zipfile
dest, keep = pathlib.Path(sys.argv[1]), {f"libbitsandbytes_cuda{v}.so" for v in sys.argv[2:]} | {"libbitsandbytes_cpu.so"}
for wheel in dest.glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        drop = {n for n in src.namelist() if re.search(r"/libbitsandbytes_\w+\.so$", n) and n.rsplit("/", 1)[1] not in keep}
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if l.split(b",")[0].decode() not in drop)
            out.writestr(info, data)
    slim.replace(wheel)
    print(f"{wheel.name}: kept {sorted(keep)}")
PY
fi
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -cm "$dest"/*.whl | tail -1 | cut -f1) MiB in $dest"
if [ ${#failed[@]} -gt 0 ]; then
  echo "no wheel for CPython $pyver manylinux x86_64: ${failed[*]}" >&2
  exit 1
fi
