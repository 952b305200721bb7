"""The GPU check cannot fail on set-up: its wheel set is complete, its environment check
names what is missing in one line, and its tiny mode records every figure a row explains.

The full preflight (a fresh environment from torch and the wheels alone) takes a few
minutes: it runs when PIXART_GPU_PREFLIGHT_WHEELS names a wheel folder made by
``bash bench/gpu_wheels.sh DIR <this Python's version>``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from bench import gpu_check, gpu_env, gpu_preflight, gpu_t5
from tests.conftest import REPO


def _requirements(distribution: str, environment: dict[str, str]) -> list[str]:
    names = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.append(gpu_preflight.canonical(requirement.name))
    return names


def _closure(names: list[str], environment: dict[str, str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = gpu_preflight.canonical(todo.pop())
        if name not in seen:
            seen.add(name)
            todo += _requirements(name, environment)
    return seen


def _declared_requirements() -> dict[str, SpecifierSet]:
    """pyproject's dependencies: canonical name -> version specifier."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    return {gpu_preflight.canonical(r.name): r.specifier for r in requirements}


def test_wheel_list_is_the_closure_of_what_the_check_imports_pinned_as_developed():
    """Every requirement (no extras) of every listed package is listed or comes with torch; every pin meets the project's requirements."""
    required, left_out = gpu_preflight.wheel_specs()
    specs = required + left_out
    listed = {gpu_preflight.canonical(s.split("==")[0]): s.split("==")[1] for s in specs}
    assert len(listed) == len(specs), "a package listed twice"
    assert "torch" not in listed and not any(name.startswith("nvidia-") for name in listed)
    # The GPU machine: Linux x86_64, CPython 3.12.
    environment = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
                       platform_machine="x86_64", sys_platform="linux", platform_system="Linux", extra="")
    with_torch = _closure(["torch"], environment) - {"torch"}
    for name in listed:
        for requirement in _requirements(name, environment):
            assert requirement in listed or requirement in with_torch or requirement == "torch", f"{name} needs {requirement}, not in gpu_wheels.txt"
    # The pins are the versions the project was developed with; a fresh install may
    # meet a newer release, which is fine as long as the pin still meets the project's
    # own requirement (the GPU machine then runs what the project allows).
    declared = _declared_requirements()
    for name, version in listed.items():
        if name in declared:
            assert declared[name].contains(version, prereleases=True), f"gpu_wheels.txt pins {name}=={version}, outside the project's {declared[name]}"
    # What the check imports is required, not left out.
    for module in ("numpy", "psutil", "pyyaml", "regex", "pillow", "requests", "huggingface-hub", "safetensors", "tokenizers",
                   "transformers", "diffusers", "peft", "accelerate", "bitsandbytes", "sentencepiece", "tqdm", "packaging"):
        assert module in {gpu_preflight.canonical(s.split("==")[0]) for s in required}, module


def test_pip_check_accepts_only_the_left_out_packages():
    output = ("huggingface-hub 2.4.0 requires hf-xet, which is not installed.\n"
              "transformers 5.24.0 requires typer, which is not installed.\n")
    assert gpu_preflight.unexpected_problems(output, ["hf-xet==1.8.0", "typer==0.29.2"]) == []
    assert gpu_preflight.unexpected_problems("No broken requirements found.\n", []) == []
    broken = "diffusers 0.42.1 requires numpy, which is not installed.\npeft 0.21.2 has requirement torch>=1.13.0, but you have torch 1.0.\n"
    assert len(gpu_preflight.unexpected_problems(broken, ["hf-xet==1.8.0"])) == 2


def test_environment_check_names_what_is_missing_in_one_line_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(gpu_env, "REQUIRED", (*gpu_env.REQUIRED, "no_such_module_abc"))
    monkeypatch.setattr(gpu_check, "environment_problems", gpu_env.environment_problems)
    monkeypatch.setattr(gpu_check, "TrainingBench", lambda *a: pytest.fail("the check started work in a broken environment"))
    assert gpu_check.main(["--tiny", "--skip-t5"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no_such_module_abc (ModuleNotFoundError" in lines[0] and "environment not ready" in lines[0]


def test_environment_check_passes_here():
    process = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--check-env"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert process.returncode == 0 and "environment ready" in process.stdout, process.stderr[-2000:]


def test_t5_runs_in_a_subprocess_under_a_time_cap():
    result = gpu_t5.t5_in_subprocess(["--tiny"], cap=0.5)
    assert result.status.startswith("skipped (time cap")


def test_checkpointing_recompute_is_the_forward_flops():
    """1024 px: forward 6.69 TFLOP of the 15.66 per sample; checkpointing runs the forward again."""
    _, setting = gpu_check.parse(["--device", "cpu", "--skip-t5"])
    total, forward = gpu_check.TrainingBench(setting).count_flops(1024, with_forward=True)
    assert total / 1e12 == pytest.approx(15.66, rel=0.01) and forward / 1e12 == pytest.approx(6.69, rel=0.01)
    result = gpu_env.TrainResult(1024, 4, True, model_tflop_per_step=4 * total / 1e12, recompute_tflop_per_step=4 * forward / 1e12,
                                 step_seconds=[0.5])
    assert gpu_env.utilisation(result, 989.0, False) == pytest.approx(4 * 15.66 / 0.5 / 989, rel=0.01)
    assert gpu_env.utilisation(result, 989.0, True) == pytest.approx(4 * (15.66 + 6.69) / 0.5 / 989, rel=0.01)


def test_tiny_mode_records_every_figure_of_a_row(tmp_path):
    """``--tiny`` end to end on the CPU: base rows, the three variants (compile through dynamo), the Trainer row, T5 in its subprocess, JSON."""
    out = tmp_path / "report.md"
    assert gpu_check.main(["--tiny", "--only", "256", "--batches", "1", "--out", str(out), "--t5-prompts", "4"]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["variant"]["name"], r["checkpointing"]): r for r in raw["train"]}
    assert set(rows) == {("base", False), ("base", True), ("bf16 LoRA", False), ("fused AdamW", False), ("bf16 LoRA + compile", False),
                         ("through Trainer", False)}
    # The last training row runs `pixart-tune train`'s own loop (dataloader, accelerate) on a random prepared dataset.
    trainer = raw["train"][-1]
    assert trainer["variant"]["name"] == "through Trainer" and trainer["status"] == "ok" and trainer["samples_per_s"] > 0
    assert trainer["resolution"] == 256 and trainer["plan_total"] is not None
    for (name, checkpointing), row in rows.items():
        assert row["status"] == "ok", row
        assert len(row["host_seconds"]) == len(row["step_seconds"]) == raw["steps"] and row["samples_per_s"] > 0
        assert row["recompute_tflop_per_step"] == (pytest.approx(row["model_tflop_per_step"] * 0.43, rel=0.3) if checkpointing else 0.0)
        if "compile" not in name:
            # Self-attention without a mask, cross-attention with one, per layer (twice when recomputed).
            assert "+mask x" in row["sdpa"] and "unknown" not in row["sdpa"], row["sdpa"]
    assert rows[("bf16 LoRA + compile", False)]["compile_seconds"] > 0
    assert rows[("bf16 LoRA", False)]["variant"]["lora_compute"] == "bf16"
    assert rows[("fused AdamW", False)]["optimizer"] == "adamw_fused"
    assert raw["t5"]["status"] == "ok" and raw["t5"]["prompts"] == 4
    text = out.read_text()
    assert "## Training variants" in text and "| bf16 LoRA + compile |" in text and "| through Trainer" in text and "SDPA calls per step" in text


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIXART_GPU_PREFLIGHT_WHEELS"), reason="set PIXART_GPU_PREFLIGHT_WHEELS to a wheel folder for this Python")
def test_full_preflight_from_the_wheels_alone(tmp_path):
    wheels = Path(os.environ["PIXART_GPU_PREFLIGHT_WHEELS"])
    assert gpu_preflight.main([str(wheels), "--venv", str(tmp_path / "venv")]) == 0
    assert "8 of 8 training configurations ran" in (tmp_path / "report.md").read_text()
