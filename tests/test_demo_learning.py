"""What the demo claims, measured: training on the bundled photos moves the model's
samples toward them, and every run, resumed or not, plots its loss to loss.png.

The tiny pipeline's VAE reconstructs colours and coarse layout (``build_tiny_vae``),
so what the model produces can be held against the training photos in pixel space.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixart_tune.base import LOSS_HISTORY, LOSS_PLOT
from pixart_tune.training import plots
from pixart_tune.training.trainer import run
from tests.conftest import REPO
from tests.training_fixtures import interrupt_then_resume, red_dataset, tiny_config  # noqa: F401  (red_dataset: a fixture)

PHOTOS = REPO / "datasets" / "samples"
TRIGGER = "sks"
# The shipped recipe (rank 32 on all linear layers, lr 1e-2) with 300 of its 400 steps.
LEARN = ["schedule.steps=300", "checkpoint.every=0", "logging.every=50"]
# What scripts/demo.sh samples: its prompt, its steps, the sampler's default guidance.
PROMPT = f"{TRIGGER}, a photo of a cat"
SEEDS = [1, 2, 3, 4]
STEPS = 10
THUMBNAIL = 32
MARGIN = 15.0  # grey levels (0-255); measured: base 85-86, adapter 45-52 (seeds 1-4, 300 training steps)


@pytest.fixture(scope="module")
def photos_dataset(tiny_model, tmp_path_factory):
    """datasets/samples prepared at 256 px with the trigger word, as scripts/demo.sh prepares it."""
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("photos") / "prepared"
    prepare_dataset(PrepareConfig(source=str(PHOTOS), out=str(out), model=tiny_model, resolution=256, trigger=TRIGGER, progress=False))
    return out


def thumbnail(image: Image.Image) -> np.ndarray:
    """32 x 32 RGB means of equal blocks, as float: colours and layout, not pixel detail."""
    return np.asarray(image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.BOX), dtype=np.float64)


def training_photos(sampler, dataset) -> list[np.ndarray]:
    """Thumbnails of the training items as training sees them: their cached latents, decoded."""
    from pixart_tune.generation import decode_latents

    return [thumbnail(decode_latents(sampler.pipe, dataset[i]["latent"][None])[0]) for i in range(len(dataset))]


def distance_to_nearest(image: Image.Image, photos: list[np.ndarray]) -> float:
    """Mean absolute difference (grey levels) from the nearest training photo, on thumbnails."""
    return min(float(np.abs(thumbnail(image) - photo).mean()) for photo in photos)


def test_samples_with_the_adapter_come_nearer_the_training_photos_than_the_base_models(tiny_model, photos_dataset, tmp_path):
    """What the demo's grid shows, measured: samples from pure noise, the demo's prompt and
    the same seeds, with and without the adapter trained on the photos. Each adapter
    sample is nearer its nearest training photo (32 x 32 thumbnails through the tiny
    VAE, which keeps colours and coarse layout) than the base sample of its seed.

    The base model's samples are saturated colour noise (its transformer is random);
    the adapter's take the photos' palette and tone.
    """
    from pixart_tune.sampling import AdapterSpec, Sampler
    from pixart_tune.training.dataset import CachedDataset

    adapter = run(tiny_config(tiny_model, photos_dataset, tmp_path / "run", *LEARN), progress=False)
    sampler = Sampler(tiny_model, device="cpu")
    photos = training_photos(sampler, CachedDataset(photos_dataset))
    prompts = [PROMPT] * len(SEEDS)
    base = [distance_to_nearest(image, photos) for image in sampler.generate(prompts, SEEDS, steps=STEPS)]
    tuned = [
        distance_to_nearest(image, photos)
        for image in sampler.generate(prompts, SEEDS, [AdapterSpec(str(adapter), 1.0)], steps=STEPS)
    ]
    assert all(t < b - MARGIN for b, t in zip(base, tuned)), (base, tuned)


def assert_readable_plot(path) -> None:
    """A valid PNG of a drawn figure (axes, labels, a curve), not an empty canvas."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 200
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert grey.std() > 10


def train_history(output_dir) -> list[list[float]]:
    return json.loads((output_dir / LOSS_HISTORY).read_text(encoding="utf-8"))[plots.TRAIN]


def test_a_run_plots_its_loss_and_a_resumed_run_continues_the_plot(tiny_model, red_dataset, tmp_path, monkeypatch):  # noqa: F811
    recipe = ["schedule.steps=8", "checkpoint.every=4", "logging.every=2"]
    whole = tmp_path / "whole"
    run(tiny_config(tiny_model, red_dataset, whole, *recipe), progress=False)
    assert_readable_plot(whole / LOSS_PLOT)
    expected = train_history(whole)
    assert [step for step, _ in expected] == [2, 4, 6, 8]

    # Crashes after step 6 (points 2, 4, 6 saved), resumes from the checkpoint at 4:
    # 6 is trained again and must appear once, with the value of the run that never stopped.
    resumed = tmp_path / "resumed"
    interrupt_then_resume(tiny_config(tiny_model, red_dataset, resumed, *recipe), monkeypatch, at_step=6)
    assert_readable_plot(resumed / LOSS_PLOT)
    assert train_history(resumed) == expected


def test_the_history_keeps_the_points_up_to_the_step_resumed_from(tmp_path):
    history = plots.LossHistory(tmp_path / LOSS_HISTORY)
    for step in (10, 20, 30):
        history.add(plots.TRAIN, step, 1.0 / step)
    history.add("eval", 20, 0.5)
    history.save()
    assert plots.LossHistory.load(tmp_path, 20).series == {plots.TRAIN: [(10, 0.1), (20, 0.05)], "eval": [(20, 0.5)]}
    assert plots.LossHistory.load(tmp_path, 0).series == {}  # a fresh run in the folder starts its own
    path = plots.plot_loss(plots.LossHistory.load(tmp_path, 30), tmp_path / LOSS_PLOT)
    assert_readable_plot(path)
