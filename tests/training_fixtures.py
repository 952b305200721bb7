"""Prepared datasets and configs for the trainer tests, built with the real ``prepare``.

Import the fixtures into a test module (``from tests.training_fixtures import ...``)
to use them. Everything runs on the tiny model at 256 px.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart_tune.training.config import TrainConfig, load_train_config
from tests.conftest import REPO

TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
RED = (220, 40, 40)
BLUE = (40, 60, 220)


def write_flat_images(
    folder: Path, colour: tuple[int, int, int], sizes: list[tuple[int, int]], caption: str, shaded: bool = False
) -> Path:
    """Flat-colour PNGs of the given (width, height) sizes, each with a .txt caption.

    ``shaded`` darkens each image a little more than the last, so that prepare keeps
    them all (it drops exact duplicates: same-size flat images of one colour are).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        shade = tuple(max(0, c - 8 * index) for c in colour) if shaded else colour
        Image.new("RGB", size, shade).save(folder / f"flat_{index}.png")
        (folder / f"flat_{index}.txt").write_text(f"{caption} {index}", encoding="utf-8")
    return folder


def prepare(model: str, source: Path, out: Path, resolution: int = 256) -> Path:
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset

    prepare_dataset(PrepareConfig(source=str(source), out=str(out), model=model, resolution=resolution, progress=False))
    return out


@pytest.fixture(scope="session")
def red_dataset(tiny_model, tmp_path_factory) -> Path:
    """Six flat red images in two buckets (square and portrait), prepared at 256 px."""
    root = tmp_path_factory.mktemp("red")
    sizes = [(256, 256)] * 4 + [(192, 320)] * 2
    source = write_flat_images(root / "source", RED, sizes, "a flat red colour")
    return prepare(tiny_model, source, root / "prepared")


@pytest.fixture(scope="session")
def blue_dataset(tiny_model, tmp_path_factory) -> Path:
    """Four distinct blue images, three landscape and one square (the square shares
    red_dataset's bucket), prepared at 256 px: a second dataset to train with red.
    (red_dataset holds two items: prepare keeps one square and one portrait.)"""
    root = tmp_path_factory.mktemp("blue")
    sizes = [(320, 192)] * 3 + [(256, 256)]
    source = write_flat_images(root / "source", BLUE, sizes, "a flat blue colour", shaded=True)
    return prepare(tiny_model, source, root / "prepared")


@pytest.fixture(scope="session")
def masked_dataset(tiny_model, tmp_path_factory) -> Path:
    """Four shaded blue images, three with a NAME.mask.png beside them (left half white:
    train there), one without, prepared at 256 px: masked-loss training."""
    root = tmp_path_factory.mktemp("masked")
    sizes = [(256, 256), (256, 256), (320, 192), (320, 192)]
    source = write_flat_images(root / "source", BLUE, sizes, "a blue thing", shaded=True)
    for index, (width, height) in enumerate(sizes[:3]):
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (0, 0, width // 2, height))
        mask.save(source / f"flat_{index}.mask.png")
    return prepare(tiny_model, source, root / "prepared")


def tiny_config(model: str, data: Path, out: Path, *overrides: str) -> TrainConfig:
    """The shipped tiny recipe pointed at test folders, quiet, with extra overrides."""
    base = [
        f"model={model}",
        f"data.path={data}",
        f"output_dir={out}",
        "logging.report_to=[]",
        "validation.prompts=[]",
    ]
    return load_train_config(TINY_RECIPE, [*base, *overrides])


def cli_env() -> dict[str, str]:
    """Environment for a trainer subprocess that computes bit-identically to this one."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = str(REPO)
    return env


def kill_train_when(args: list[str], out: Path, step: int) -> None:
    """Runs ``pixart-tune train`` with ``args`` in a subprocess and kills it with SIGKILL as
    soon as checkpoint ``step`` exists (mid-way, possibly while it writes or prunes one)."""
    import signal
    import subprocess
    import sys
    import time

    from pixart_tune.training import checkpoint as ckpt

    command = [sys.executable, "-m", "pixart_tune.cli", "train", str(TINY_RECIPE), *args, "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (ckpt.checkpoint_root(out) / f"step-{step:06d}").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the training subprocess made no checkpoint at step {step}"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert not (out / "adapter").exists(), "the run finished before it was killed; the test proves nothing"


class Interrupted(Exception):
    """Stands for a crash in the middle of training."""


def interrupt_then_resume(config: TrainConfig, monkeypatch, at_step: int) -> Path:
    """Runs ``config`` until optimizer step ``at_step`` (a crash there), then ``--resume latest``; the resumed run's adapter.

    Every patch of ``monkeypatch`` is undone before the resumed run.
    """
    from pixart_tune.training.trainer import Trainer, run

    original = Trainer.train_step

    def crash(self, batch):
        if self.state.step == at_step:
            raise Interrupted
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(Interrupted):
        run(config, progress=False)
    monkeypatch.undo()
    return run(config, resume="latest", progress=False)


def assert_same_adapter(expected: Path, actual: Path) -> None:
    """Bit-identical LoRA weights in two adapter folders."""
    from safetensors.torch import load_file

    a, b = load_file(expected / "adapter_model.safetensors"), load_file(actual / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
