"""Validation grids during training: the base model once, then the adapter every N steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixart_tune.adapters.export import find_samples
from pixart_tune.generation import image_grid
from pixart_tune.sampling import Sampler
from pixart_tune.training.trainer import run
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (fixture)

PROMPTS = ["a photo of a red cat", "a flat red colour"]
SEEDS = [0, 1]
VALIDATION = ["validation.every=2", f"validation.prompts={PROMPTS}", f"validation.seeds={SEEDS}", "validation.steps=3",
              "schedule.steps=4", "schedule.warmup_steps=0", "optim.lr=1e-2", "lora.dropout=0.1", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def validated(tiny_model, red_dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("validated") / "run"
    run(tiny_config(tiny_model, red_dataset, out, *VALIDATION, "logging.report_to=[tensorboard]"), progress=False)
    return out


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_grids_of_every_validation_and_the_base_once(validated):
    samples = validated / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["base.png", "step-000002.png", "step-000004.png"]
    base, first, last = (_pixels(samples / name) for name in ("base.png", "step-000002.png", "step-000004.png"))
    assert base.shape == first.shape == last.shape
    assert np.abs(last - base).mean() > 1.0, "the trained adapter left the validation images as the base draws them"
    assert list((validated / "logs").glob("events.out.tfevents.*")), "no TensorBoard log"
    # A published card shows the adapter's newest grid, never the base.
    assert find_samples(validated / "adapter") == [samples / "step-000004.png"]


def test_the_base_grid_is_the_base_model(validated, tiny_model):
    """The adapter is really off: the base grid equals the pipeline without any adapter."""
    sampler = Sampler(tiny_model, device="cpu", dtype="fp32")
    images = [image for prompt in PROMPTS for image in sampler.generate([prompt] * len(SEEDS), SEEDS, steps=3)]
    expected = image_grid(images, cols=len(SEEDS), row_labels=PROMPTS, col_labels=[f"seed {s}" for s in SEEDS])
    assert np.abs(_pixels(validated / "samples" / "base.png") - np.asarray(expected, dtype=np.int16)).max() <= 2


def test_validating_does_not_change_the_training(validated, tiny_model, red_dataset, tmp_path):  # noqa: F811
    """Same adapter with and without validation: its RNG streams and trainable flags are restored."""
    plain = tmp_path / "plain"
    run(tiny_config(tiny_model, red_dataset, plain, *VALIDATION, "validation.every=0", "validation.prompts=[]"), progress=False)
    expected = load_file(plain / "adapter" / "adapter_model.safetensors")
    actual = load_file(validated / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_validation_sizes_come_in_sixteens():
    """8 pixels per latent, 2x2 latents per patch: a 264 px grid would fail mid-run, so the recipe is refused."""
    from pixart_tune.training.config import ValidationSection

    assert ValidationSection(every=1, prompts=["a cat"], height=272, width=256).height == 272
    with pytest.raises(ValueError, match="multiples of 16"):
        ValidationSection(every=1, prompts=["a cat"], height=264)


def test_the_end_of_training_says_what_it_draws_and_lists_its_files(tiny_model, red_dataset, tmp_path, capsys, caplog):  # noqa: F811
    from pixart_tune.commands.train import main as cli
    from tests.training_fixtures import TINY_RECIPE

    out = tmp_path / "run"
    overrides = [f"model={tiny_model}", f"data.path={red_dataset}", f"output_dir={out}", "logging.report_to=[]",
                 f"validation.prompts={PROMPTS}", f"validation.seeds={SEEDS}", "validation.steps=2", "validation.every=0",
                 "schedule.steps=2", "schedule.warmup_steps=0", "checkpoint.every=1"]
    with caplog.at_level("INFO", logger="pixart_tune"):
        assert cli([str(TINY_RECIPE), *overrides, "--no-progress"]) == 0
    # 2 prompts x 2 seeds, for the adapter and, the first time, the base model
    assert f"drawing 8 validation images into {out / 'samples'}" in caplog.text
    printed = capsys.readouterr().out
    assert f"the run's files are in {out}/" in printed
    assert "adapter/" in printed
    assert "base.png, step-000002.png" in printed
    assert "step-000001 (continue with --resume latest)" in printed
    assert len(printed.splitlines()) <= 8
