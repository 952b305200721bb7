"""Fault injection for ``train``, ``plan`` and ``init-tiny``: bad input as a careless or unlucky user gives it.

Each row of ``CASES`` sets up one fault (a recipe value, an output folder, a
damaged dataset or checkpoint, a full disk), runs the real command line through
``pixart_tune.cli.main`` and states the outcome: the exit code, one line naming the
file or value and the fix, no traceback, and every file the user had before the
run left as it was (``keep``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from pixart_tune import cli
from pixart_tune.data.cache import FeatureCache
from pixart_tune.training import checkpoint as ckpt
from tests.training_fixtures import TINY_RECIPE, cli_env, red_dataset  # noqa: F401  (fixture)

XL2_HUB_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
"""Planned from the built-in XL-2 architecture: nothing is downloaded."""


@dataclasses.dataclass
class Ctx:
    tmp: Path
    model: str
    data: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    keep: list[Path] = dataclasses.field(default_factory=list)
    """Files and folders the user had: they must come out of the run unchanged."""

    def train(self, *overrides: str, resume: str | None = None, data: Path | None = None) -> list[str]:
        base = [
            f"model={self.model}", f"data.path={data or self.data}", f"output_dir={self.out}", "logging.tensorboard=false",
            "validation.prompts=[]", "schedule.steps=2", "checkpoint.every=1", "logging.every=1",
        ]
        return ["train", "--no-progress", *(["--resume", resume] if resume else []), str(TINY_RECIPE), *base, *overrides]

    def plan(self, *args: str) -> list[str]:
        return ["plan", str(TINY_RECIPE), f"model={self.model}", *args]

    def copy_data(self) -> Path:
        """A copy of the prepared dataset to damage."""
        target = self.tmp / "data"
        if not target.exists():
            shutil.copytree(self.data, target)
        return target

    def first_run(self, *overrides: str) -> None:
        """A clean run into output_dir with checkpoints at steps 1 and 2."""
        assert cli.main(self.train("checkpoint.keep_last=3", *overrides)) == 0


@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[Ctx], list[str]]
    """Sets up the fault and returns the command line."""
    code: int
    says: str
    """A regular expression one line of the output matches."""
    check: Callable[[Ctx], None] | None = None


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(file.relative_to(path.parent)).encode())
        if file.is_file():
            h.update(file.read_bytes())
    return h.hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# the faults ---------------------------------------------------------------------------
def recipe_file(text: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        return ["train", "--no-progress", str(write(c.tmp / "recipe.yaml", text)), f"output_dir={c.out}"]
    return argv


def init_tiny_over(c: Ctx, mine: str, out: str) -> list[str]:
    """init-tiny into ``out`` where the user already has the file ``mine``."""
    c.keep.append(write(c.tmp / mine, "mine"))
    return ["init-tiny", str(c.tmp / out)]


CASES = [
    # recipe values: refused in one line naming the key, before anything is written
    Case("optim.lr=.nan", lambda c: c.train("optim.lr=.nan"), 1, r"error: optim.lr: nan is not a finite number"),
    Case("optim.lr=nan (string)", lambda c: c.train("optim.lr=nan"), 1, r"error: optim.lr: nan is not a finite number"),
    Case("optim.eps=-1", lambda c: c.train("optim.eps=-1"), 1, r"error: optim.eps must be positive"),
    Case("seed=-1", lambda c: c.train("seed=-1"), 1, r"error: .*seed must be in \[0, 2\*\*32\), got -1"),
    Case("seed=2**32", lambda c: c.train(f"seed={2**32}"), 1, r"error: .*seed must be in \[0, 2\*\*32\), got 4294967296"),
    Case("lora.alpha=.inf", lambda c: c.train("lora.alpha=.inf"), 1, r"error: lora.alpha: inf is not a finite number"),
    Case("validation.steps=0", lambda c: c.train("validation.steps=0"), 1, r"error: validation.steps must be at least 1, got 0"),
    Case("validation.seeds=[-1]", lambda c: c.train("validation.seeds=[-1]"), 1, r"error: validation.seeds must be in \[0, 2\*\*32\)"),
    Case("validation.height=100000", lambda c: c.train("validation.height=100000"), 1, r"error: validation.height and validation.width must be multiples of 16 from 64 to 4096, got 100000"),
    Case("lora.targets matching nothing", lambda c: c.train("lora.targets=nothing_here"), 1, r"error: lora.targets 'nothing_here' matches no layer of .*; use a preset"),
    Case("lora.targets not a regex", lambda c: c.train("lora.targets=(["), 1, r"error: .*lora.targets '\(\[' is not a valid regular expression"),
    Case("recipe is a YAML list", recipe_file("- model: tiny\n- seed: 1\n"), 1, r"error: .*recipe.yaml: holds a YAML list, not a mapping of keys"),
    Case("recipe is a YAML scalar", recipe_file("42\n"), 1, r"error: .*recipe.yaml: holds a YAML int \(42\), not a mapping"),
    Case("recipe not YAML", recipe_file("model: [unclosed\n"), 1, r"error: .*recipe.yaml: not valid YAML"),
    Case("recipe not UTF-8", lambda c: (c.tmp / "r.yaml").write_bytes(b"seed: \xff\n") and ["train", str(c.tmp / "r.yaml")], 1, r"error: .*r.yaml: not UTF-8 text"),
    # plan
    Case("plan --budget-gb -5", lambda c: c.plan("--budget-gb", "-5"), 1, r"error: --budget-gb -5: give the GPU memory in GiB, a positive number"),
    Case("plan --budget-gb nan", lambda c: c.plan("--budget-gb", "nan"), 1, r"error: --budget-gb nan: give the GPU memory"),
    Case("plan memory_budget_gb=.nan", lambda c: c.plan("memory_budget_gb=.nan"), 1, r"error: memory_budget_gb: nan is not a finite number"),
    Case("plan on a folder that is not a model", lambda c: ["plan", str(TINY_RECIPE), f"model={c.data}"], 1, r"error: model .* is not a PixArt-Sigma model folder \(no transformer/config.json\)"),
    Case("plan on a missing folder", lambda c: ["plan", str(TINY_RECIPE), f"model={c.tmp / 'nowhere'}"], 1, r"error: model .*nowhere does not exist"),
    # init-tiny
    Case("init-tiny into a non-empty folder", lambda c: init_tiny_over(c, "models/notes.txt", "models"), 1, r"error: .*models exists and is not empty; choose a new folder"),
    Case("init-tiny onto a file", lambda c: init_tiny_over(c, "afile", "afile"), 1, r"error: .*afile is a file, not a folder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, tmp_path, tiny_model, red_dataset, monkeypatch, capsys):  # noqa: F811
    ctx = Ctx(tmp_path, tiny_model, red_dataset, tmp_path / "out", monkeypatch)
    argv = case.argv(ctx)
    capsys.readouterr()
    before = {path: digest(path) for path in ctx.keep}
    code = cli.main(argv)
    output = capsys.readouterr()
    text = output.out + output.err
    assert "Traceback" not in text
    assert code == case.code, text
    assert re.search(case.says, text, re.MULTILINE), text
    if case.code != 0:
        verb = argv[0]
        errors = [line for line in output.err.splitlines() if line.startswith(f"pixart-tune {verb}: error:")]
        assert len(errors) == 1 and output.err.strip().endswith(errors[0]), output.err
    assert {path: digest(path) for path in ctx.keep} == before, "a file the user had changed"
    if case.check is not None:
        case.check(ctx)


def test_plan_of_a_huge_rank_never_allocates(tmp_path):
    """lora.rank=1000000 on XL-2 would be 4.6 GB per LoRA matrix: planned on the meta device under a 3 GiB data limit."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))

    command = [sys.executable, "-m", "pixart_tune.cli", "plan", str(TINY_RECIPE), f"model={XL2_HUB_ID}", "lora.rank=1000000", "validation.prompts=[]"]
    result = subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "does NOT fit" in result.stdout
