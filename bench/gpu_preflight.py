"""CPU preflight of the GPU check: builds an environment from torch and the wheel set alone, and runs the check there.

The GPU machine has Python, PyTorch (CUDA) and PyTorch's own dependencies, and no
network. This script makes the same kind of environment on any machine: a fresh
virtual environment (no system site-packages, no PYTHONPATH) with only torch,
then every wheel of WHEELDIR installed offline without dependency resolution
(``pip install --no-index --no-deps``), as on the GPU machine. In it, it runs

1. ``pip check``: every installed package's requirements are met, except those
   ``bench/gpu_wheels.txt`` marks ``#left-out`` (and only them);
2. ``bench/gpu_check.py --tiny --check-env``: the environment check passes;
3. ``bench/gpu_check.py --tiny``: every section on tiny models on the CPU, from
   this repository, which is not installed there (as on the GPU machine).

If all three pass, the wheel set is complete. The wheels must match this machine's
Python: ``bash bench/gpu_wheels.sh DIR 3.11`` for a Python 3.11 here.

    python bench/gpu_preflight.py WHEELDIR                    # a temporary environment, removed after
    python bench/gpu_preflight.py WHEELDIR --venv /tmp/pf     # kept, for a look afterwards

Prints one line per stage and exits 0 when all pass; the tiny report is written
beside the environment (``report.md``, ``report.json``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEEL_LIST = REPO / "bench" / "gpu_wheels.txt"


def wheel_specs(path: Path = WHEEL_LIST) -> tuple[list[str], list[str]]:
    """(required, left out): the ``name==version`` lines of the wheel list."""
    required, left_out = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        target = left_out if line.startswith("#left-out ") else required
        spec = line.removeprefix("#left-out ").split("#", 1)[0].strip()
        if spec and "==" in spec:
            target.append(spec)
    return required, left_out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unexpected_problems(pip_check_output: str, left_out: list[str]) -> list[str]:
    """The lines of ``pip check`` that do not name a missing ``#left-out`` package."""
    allowed = {canonical(spec.split("==")[0]) for spec in left_out}
    problems = []
    for line in pip_check_output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        missing = re.search(r"requires ([A-Za-z0-9_.\-]+), which is not installed", line)
        if missing and canonical(missing.group(1)) in allowed:
            continue
        problems.append(line)
    return problems


def run(command: list[str], env: dict[str, str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(command)}\n")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with log.open("a", encoding="utf-8") as out:
        out.write(result.stdout + result.stderr)
    return result


def preflight(wheels: Path, venv: Path, torch_spec: str, log: Path) -> list[str]:
    """Builds the environment and runs the three stages; returns what failed (empty: all passed)."""
    wheel_files = sorted(wheels.glob("*.whl"))
    if not wheel_files:
        return [f"no wheels in {wheels}"]
    if any(w.name.startswith("torch-") for w in wheel_files):
        return [f"{wheels} holds a torch wheel: the GPU machine brings its own"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    stages = [
        ("venv", [sys.executable, "-m", "venv", str(venv)], 300),
        # The torch of the GPU machine, with its own dependencies and nothing else (here a CPU build).
        ("torch", [*pip, "install", "--quiet", torch_spec], 900),
        ("wheels", [*pip, "install", "--quiet", "--no-index", "--no-deps", *map(str, wheel_files)], 600),
    ]
    for name, command, timeout in stages:
        started = time.monotonic()
        result = run(command, env, timeout, log)
        if result.returncode != 0:
            return [f"{name}: exit {result.returncode}: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"]
        print(f"preflight: {name} ok ({time.monotonic() - started:.0f} s)", flush=True)
    failures = []
    _, left_out = wheel_specs()
    check = run([*pip, "check"], env, 120, log)
    problems = unexpected_problems(check.stdout + check.stderr, left_out)
    if problems:
        failures.append("pip check: " + "; ".join(problems))
    else:
        accepted = len([line for line in check.stdout.splitlines() if line.strip() and not line.startswith("No broken")])
        print(f"preflight: pip check ok ({accepted} missing requirements, all of them #left-out)", flush=True)
    check_env = run([str(python), "bench/gpu_check.py", "--tiny", "--check-env"], env, 300, log)
    if check_env.returncode != 0:
        failures.append(f"environment check: {(check_env.stderr or check_env.stdout).strip().splitlines()[-1:]}")
    else:
        print(f"preflight: {check_env.stdout.strip()}", flush=True)
    out = venv.parent / "report.md"
    started = time.monotonic()
    tiny = run([str(python), "bench/gpu_check.py", "--tiny", "--only", "256", "--t5-prompts", "4", "--out", str(out)], env, 900, log)
    if tiny.returncode != 0:
        failures.append(f"gpu_check --tiny: exit {tiny.returncode}: {(tiny.stderr or tiny.stdout).strip().splitlines()[-1:]}")
    else:
        print(f"preflight: {tiny.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.0f} s)", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="the wheel folder of bench/gpu_wheels.sh, for this machine's Python")
    parser.add_argument("--venv", type=Path, help="where to build the environment (default: a temporary folder, removed after)")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed first (default torch==2.13.0)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="gpu_preflight_")) if args.venv is None else args.venv.resolve().parent
    venv = folder / "venv" if args.venv is None else args.venv.resolve()
    if venv.exists():
        parser.error(f"{venv} exists: the preflight needs a fresh environment")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "preflight.log"
    print(f"preflight: building {venv} from {args.torch} and {args.wheels} (log: {log})", flush=True)
    failures = preflight(args.wheels.resolve(), venv, args.torch, log)
    if args.venv is None:
        shutil.rmtree(venv, ignore_errors=True)
    for failure in failures:
        print(f"preflight FAILED: {failure}", flush=True)
    if not failures:
        print(f"preflight passed: the wheel set installs offline beside torch alone and gpu_check --tiny runs there (report: {folder / 'report.md'})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
