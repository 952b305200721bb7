"""Several prepared datasets in one run, each with repeats: config, epochs, training, refusals."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pixart_tune.config import ConfigError
from pixart_tune.errors import UserError
from pixart_tune.training.config import ExtraDataset, load_train_config
from pixart_tune.training.dataset import BucketBatchSampler, TrainingSet, collate, dataset_fingerprint
from pixart_tune.training.memory import plan_memory, resolution_of
from pixart_tune.training.trainer import Trainer, run
from tests.training_fixtures import (  # noqa: F401  (fixtures)
    BLUE,
    TINY_RECIPE,
    assert_same_adapter,
    blue_dataset,
    interrupt_then_resume,
    prepare,
    red_dataset,
    tiny_config,
    write_flat_images,
)


def _extra(*entries: tuple[Path, int]) -> str:
    """The ``data.extra=[...]`` override of (folder, repeats) pairs."""
    return "data.extra=[" + ", ".join(f"{{path: '{path}', repeats: {repeats}}}" for path, repeats in entries) + "]"


def _adapter_header(adapter: Path) -> dict[str, str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


# --- config ------------------------------------------------------------------------


def test_extra_datasets_load_from_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  path: data/subject\n  repeats: 10\n  extra:\n    - path: data/class\n    - {path: data/more, repeats: 3}\n",
        encoding="utf-8",
    )
    config = load_train_config(recipe)
    assert (config.data.path, config.data.repeats) == (Path("data/subject"), 10)
    assert config.data.extra == [ExtraDataset(Path("data/class"), 1), ExtraDataset(Path("data/more"), 3)]
    assert config.data.sources() == [(Path("data/subject"), 10), (Path("data/class"), 1), (Path("data/more"), 3)]

    config = load_train_config(TINY_RECIPE, ["data.extra=[{path: data/class, repeats: 2}]"])
    assert config.data.extra == [ExtraDataset(Path("data/class"), 2)] and config.data.repeats == 1
    assert load_train_config(TINY_RECIPE).data.extra == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.extra=[{path: data/class, repeat: 2}]"], r"unknown key 'data\.extra\[0\]\.repeat'; known keys here: kind, loss_weight, path, ratio, repeats"),
        (["data.extra=[{path: a}, {path: b, repeats: 0}]"], r"data\.extra\[1\]: repeats must be at least 1, got 0"),
        (["data.extra=[{repeats: 2}]"], r"missing key 'data\.extra\[0\]\.path'"),
        (["data.extra=data/class"], r"data\.extra: expected a list"),
        (["data.repeats=0"], r"data\.repeats must be at least 1"),
        (["data.path=data/a", "data.extra=[{path: ./data/a/}]"], r"data\.extra\[0\] \(data/a\) is the same dataset as data\.path.*repeats"),
        (["data.extra=[{path: b}, {path: c}, {path: b, repeats: 4}]"], r"data\.extra\[2\] \(b\) is the same dataset as data\.extra\[0\]"),
        (["data.path=null", "data.extra=[{path: b}]"], r"data\.extra needs data\.path"),
    ],
)
def test_bad_dataset_lists_are_refused_naming_the_entry(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY_RECIPE, overrides)


def test_the_same_folder_through_a_symlink_is_the_same_dataset(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="same dataset as data.path"):
        load_train_config(TINY_RECIPE, [f"data.path={tmp_path / 'real'}", _extra((tmp_path / "link", 2))])


# --- epochs ------------------------------------------------------------------------


def test_an_epoch_holds_each_item_repeats_times_in_one_bucket_batches(red_dataset, blue_dataset):
    # red: one square, one portrait item; blue: three landscape, one square.
    data = TrainingSet([(red_dataset, 3), (blue_dataset, 2)])
    assert (len(data), data.epoch_size) == (6, 2 * 3 + 4 * 2)
    assert data.repeats == [3] * 2 + [2] * 4
    red, blue = set(range(2)), set(range(2, 6))
    sampler = BucketBatchSampler(data.buckets, batch_size=2, seed=7, repeats=data.repeats)
    epochs = [sampler.epoch_batches(epoch) for epoch in range(3)]
    for batches in epochs:
        counts = Counter(index for batch in batches for index in batch)
        assert {counts[i] for i in red} == {3} and {counts[i] for i in blue} == {2}
        assert sum(counts.values()) == data.epoch_size
        assert all(len({data.buckets[i] for i in batch}) == 1 for batch in batches)
    # The shared square bucket mixes the two datasets' items within one epoch.
    square = [i for batch in epochs[0] for i in batch if data.buckets[i] == (256, 256)]
    assert red & set(square) and blue & set(square)
    # Order from seed and epoch alone: a fresh sampler agrees, the next epoch differs.
    again = BucketBatchSampler(data.buckets, batch_size=2, seed=7, repeats=data.repeats)
    assert again.epoch_batches(1) == epochs[1] and epochs[0] != epochs[1]
    # Resume skips to the batch; two DDP ranks take distinct batches, as many each.
    sampler.set_epoch(1, start=3)
    assert list(sampler) == epochs[1][3:]
    ranks = [BucketBatchSampler(data.buckets, 2, seed=7, num_replicas=2, rank=r, repeats=data.repeats) for r in (0, 1)]
    dealt = [r.rank_batches(1) for r in ranks]
    assert len(dealt[0]) == len(dealt[1]) and sorted(dealt[0] + dealt[1]) == sorted(epochs[1][: 2 * len(dealt[0])])
    # Real batches from disk: every one stacks into one latent shape.
    loader = torch.utils.data.DataLoader(data, batch_sampler=again, collate_fn=collate)
    shapes = {tuple(batch.latents.shape[2:]) for batch in loader}
    assert shapes == {(32, 32), (40, 24), (24, 40)}


def test_repeats_of_one_leave_the_single_dataset_order_and_fingerprint(red_dataset):
    data = TrainingSet([(red_dataset, 1)])
    plain = BucketBatchSampler(data.buckets, batch_size=2, seed=3)
    weighted = BucketBatchSampler(data.buckets, batch_size=2, seed=3, repeats=data.repeats)
    assert [plain.epoch_batches(e) for e in range(3)] == [weighted.epoch_batches(e) for e in range(3)]
    twice = dataset_fingerprint(TrainingSet([(red_dataset, 2)]))
    assert len({dataset_fingerprint(data), twice}) == 2


# --- training ----------------------------------------------------------------------

SHORT = ["schedule.steps=3", "checkpoint.every=0", "logging.every=1"]


def test_two_datasets_train_and_the_adapter_fingerprint_covers_both(tiny_model, red_dataset, blue_dataset, tmp_path, caplog):
    alone = run(tiny_config(tiny_model, red_dataset, tmp_path / "alone", *SHORT), progress=False)
    caplog.clear()  # the first run's lines too, had an earlier test left the toolkit's logger at INFO
    with caplog.at_level(logging.INFO, logger="pixart_tune.training.trainer"):
        both = run(tiny_config(tiny_model, red_dataset, tmp_path / "both", *SHORT, _extra((blue_dataset, 2))), progress=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training on"))
    assert f"{red_dataset}: 2 images x 1 = 2 (256 px); {blue_dataset}: 4 images x 2 = 8 (256 px)" in line
    # Square 1 + 2 copies -> 2 batches of 2, portrait 1 -> 1, landscape 3 x 2 -> 3.
    assert "epoch: 10 samples in 6 batches" in line

    header, alone_header = _adapter_header(both), _adapter_header(alone)
    assert header["dataset_fingerprint"] != alone_header["dataset_fingerprint"]
    assert len(header["dataset_fingerprint"]) == 32
    assert json.loads(header["resolution"]) == 256
    extra = [{"path": str(blue_dataset), "repeats": 2, "kind": "instance", "loss_weight": 1.0, "ratio": 1.0}]
    assert json.loads(header["training_config"])["data"]["extra"] == extra
    saved = load_train_config(tmp_path / "both" / "config.yaml")
    assert saved.data.extra == [ExtraDataset(blue_dataset, 2)]


def test_extra_datasets_may_come_from_another_bucket_table(tiny_model, red_dataset, tmp_path):
    """Multi-resolution: ``resolution`` binds the main dataset only; plan sizes by the largest."""
    source = write_flat_images(tmp_path / "src", BLUE, [(512, 512)] * 2, "blue", shaded=True)
    big = prepare(tiny_model, source, tmp_path / "big", resolution=512)
    config = tiny_config(tiny_model, red_dataset, tmp_path / "out", "schedule.steps=4", "checkpoint.every=0", _extra((big, 1)))
    trainer = Trainer(config, progress=False)
    trainer.setup()
    try:
        # One epoch is 3 batches (256 px square, portrait, 512 px square pair): all get trained.
        assert len(trainer.sampler.epoch_batches(0)) == 3
        shapes = [tuple(trainer.next_batch().latents.shape) for _ in range(3)]
        assert sorted(shapes) == [(1, 4, 32, 32), (1, 4, 40, 24), (2, 4, 64, 64)]
        for _ in range(3):
            trainer.train_step(trainer.next_batch())
    finally:
        trainer.cleanup()
    assert resolution_of(config) == 512
    assert "largest 512 px bucket" in plan_memory(config, resolution_of(config)).description[2]
    # Before an extra dataset is prepared, the plan assumes the main resolution.
    assert resolution_of(tiny_config(tiny_model, red_dataset, tmp_path / "o", _extra((tmp_path / "later", 1)))) == 256


def test_resume_with_extra_datasets_ends_with_the_uninterrupted_adapter(tiny_model, red_dataset, blue_dataset, tmp_path, monkeypatch):
    # Accumulation, LoRA and caption dropout on: the resume must restore the data
    # position within the repeated, concatenated epoch and every RNG stream.
    overrides = ["schedule.steps=10", "schedule.grad_accum=2", "lora.dropout=0.1", "data.caption_dropout=0.3",
                 "checkpoint.every=4", "logging.every=5", "data.repeats=2", _extra((blue_dataset, 3))]
    straight = run(tiny_config(tiny_model, red_dataset, tmp_path / "straight", *overrides), progress=False)
    # Step 6 is two optimizer steps past the checkpoint at 4: those two are lost.
    resumed = interrupt_then_resume(tiny_config(tiny_model, red_dataset, tmp_path / "resumed", *overrides), monkeypatch, at_step=6)
    assert_same_adapter(straight, resumed)
    # Epochs of 9 batches (square 2 + 3 copies -> 3, portrait 2 -> 1, landscape 9 -> 5):
    # 10 steps x 2 micro-batches crossed two epoch boundaries, the interrupt was mid-epoch.
    assert _adapter_header(straight)["dataset_fingerprint"] == _adapter_header(resumed)["dataset_fingerprint"]


# --- refusals ----------------------------------------------------------------------


def _variant(tiny_model: str, out: Path, part: str) -> str:
    """A copy of the tiny model with one real component swapped for another one."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    shutil.copytree(tiny_model, out)
    if part == "vae":
        # The SD 1.x VAE's scaling factor: another latent space scale than SDXL's.
        vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", scaling_factor=0.18215)
        shutil.rmtree(out / "vae")
        vae.save_pretrained(out / "vae")
        return str(out)
    config = T5EncoderModel.from_pretrained(tiny_model, subfolder="text_encoder").config
    if part == "wide_text":
        config.d_model = 48
    torch.manual_seed(1)  # other weights than the tiny model's T5
    shutil.rmtree(out / "text_encoder")
    T5EncoderModel(config).save_pretrained(out / "text_encoder")
    return str(out)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("text", r"text encoder: the empty prompt encodes differently"),
        ("wide_text", r"caption channels: 32 vs 48; text encoder"),
        ("vae", r"VAE scaling factor: 0\.13025 vs 0\.18215"),
    ],
)
def test_a_dataset_from_another_model_is_refused_naming_both(tiny_model, red_dataset, tmp_path, part, message):
    model = _variant(tiny_model, tmp_path / "model", part)
    other = prepare(model, write_flat_images(tmp_path / "src", BLUE, [(256, 256)] * 2, "blue"), tmp_path / "other")
    config = tiny_config(tiny_model, red_dataset, tmp_path / "out", _extra((other, 1)))
    with pytest.raises(UserError, match=message) as error:
        Trainer(config, progress=False).setup()
    text = str(error.value)
    assert f"dataset {other} does not fit the main dataset {red_dataset}" in text
    assert "re-run 'pixart-tune prepare'" in text and model in text


def test_a_missing_extra_dataset_is_named(tiny_model, red_dataset, tmp_path):
    config = tiny_config(tiny_model, red_dataset, tmp_path / "out", _extra((tmp_path / "class", 1)))
    with pytest.raises(UserError, match=f"{tmp_path / 'class'} is not a prepared dataset"):
        Trainer(config, progress=False).setup()


def test_epochs_set_the_steps_from_the_data(tiny_model, red_dataset, blue_dataset, tmp_path):  # noqa: F811
    """schedule.epochs: every batch of every epoch once, accumulation included; config.yaml records the steps."""
    import yaml

    from pixart_tune.training.trainer import epochs_to_steps

    assert epochs_to_steps(3, 4, 1) == 12 and epochs_to_steps(3, 5, 2) == 8 and epochs_to_steps(1, 1, 4) == 1
    out = tmp_path / "epochs"
    config = tiny_config(tiny_model, red_dataset, out, "schedule.epochs=2", "schedule.grad_accum=2", "schedule.warmup_steps=0",
                         "checkpoint.every=0", f"data.extra=[{{path: {blue_dataset}, repeats: 2}}]")
    recipe_steps = config.schedule.steps
    trainer = Trainer(config, progress=False)
    trainer.setup()
    try:
        batches = len(trainer.sampler)
        assert trainer.config.schedule.steps == epochs_to_steps(2, batches, 2) != recipe_steps
        assert config.schedule.steps == recipe_steps, "the caller's config was changed"
        trainer.train()
    finally:
        trainer.cleanup()
    assert yaml.safe_load((out / "config.yaml").read_text())["schedule"]["steps"] == trainer.config.schedule.steps
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        tiny_config(tiny_model, red_dataset, out, "schedule.epochs=0")
