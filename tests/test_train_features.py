"""The trainer's newer features end to end on the tiny model: EMA, held-out evaluation,
prior preservation, timestep schemes, Prodigy and schedule-free AdamW; each resumes
exactly after kill -9. Their math is tested in test_ema, test_timestep_math,
test_optim_extras, test_evaluation and test_loss_math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixart_tune.training import checkpoint as ckpt
from pixart_tune.training.trainer import Trainer, run
from tests.training_fixtures import blue_dataset, kill_train_when, masked_dataset, red_dataset, tiny_config  # noqa: F401  (fixtures)

COMMON = ["schedule.steps=12", "checkpoint.every=4", "checkpoint.keep_last=2", "logging.every=2", "lora.dropout=0.1",
          "data.caption_dropout=0.3", "schedule.lr_scheduler=constant_with_warmup"]
# Two recipes that between them switch every new feature on.
FEATURES = {
    "ema-eval-class-prodigy": [
        "ema.enabled=true", "ema.decay=0.8", "ema.start_step=2",
        "data.eval_fraction=0.5", "evaluation.every=4", "evaluation.timesteps=[50,500,950]",
        "diffusion.timesteps.sampling=logit_normal", "diffusion.timesteps.mean=-0.5", "diffusion.weighting=soft_min_snr",
        "optim.name=prodigy", "optim.lr=1.0", "optim.d_coef=0.5", "optim.betas=[0.9,0.99]",
    ],
    "masks-schedulefree-range-debiased": [
        "data.mask_floor=0.05",
        "ema.enabled=true", "ema.decay=0.9", "ema.every=2",
        "diffusion.timesteps.sampling=range", "diffusion.timesteps.range=[100,600]", "diffusion.timesteps.range_bias=4",
        "diffusion.weighting=debiased", "optim.name=adamw_schedulefree", "optim.lr=1e-2",
    ],
}


def _class_data(blue: Path) -> list[str]:
    return [f"data.extra=[{{path: {blue}, kind: class, loss_weight: 0.5, ratio: 1.0}}]"]


def _weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FEATURES))
def test_kill_9_then_resume_matches_the_uninterrupted_run(name, tiny_model, red_dataset, blue_dataset, masked_dataset, tmp_path):  # noqa: F811
    overrides = [*COMMON, *FEATURES[name], *(_class_data(blue_dataset) if "class" in name else [])]
    data = masked_dataset if "masks" in name else red_dataset
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = [f"model={tiny_model}", f"data.path={data}", f"output_dir={killed}", "logging.report_to=[]", "validation.prompts=[]", *overrides]
    kill_train_when(args, killed, step=8)
    assert (ckpt.list_checkpoints(killed)[-1] / "ema.pt").is_file(), "the checkpoint holds no EMA state"

    run(tiny_config(tiny_model, data, killed, *overrides), resume="latest", progress=False)
    run(tiny_config(tiny_model, data, straight, *overrides), progress=False)

    for folder in ("adapter", "adapter_raw"):
        assert _same(_weights(straight / folder), _weights(killed / folder)), f"{folder} differs after kill -9 and resume"
    # The EMA is what is published, and it is not the raw weights.
    assert not _same(_weights(straight / "adapter"), _weights(straight / "adapter_raw"))
    history = json.loads((straight / "loss.json").read_text())
    assert json.loads((killed / "loss.json").read_text()) == history
    if "eval" in name:
        # Fixed timesteps and noise: the held-out loss of the resumed run is the uninterrupted one's, to the bit.
        assert [step for step, _ in history["eval"]] == [0, 4, 8, 12]
        header = json.loads(json.dumps(_header(straight / "adapter")))
        metrics = json.loads(header["metrics"])
        assert metrics["eval/loss"] == pytest.approx(history["eval"][-1][1], abs=1e-6)


def _header(adapter: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


def test_the_ema_leaves_training_as_it_was(tiny_model, red_dataset, tmp_path):  # noqa: F811
    """adapter_raw/ of a run with an EMA is, bit for bit, the adapter of the same run without one."""
    plain = ["schedule.steps=5", "checkpoint.every=0", "lora.dropout=0.1"]
    run(tiny_config(tiny_model, red_dataset, tmp_path / "plain", *plain), progress=False)
    run(tiny_config(tiny_model, red_dataset, tmp_path / "ema", *plain, "ema.enabled=true", "ema.decay=0.5"), progress=False)
    assert _same(_weights(tmp_path / "plain" / "adapter"), _weights(tmp_path / "ema" / "adapter_raw"))
    assert not (tmp_path / "plain" / "adapter_raw").exists()


def test_the_held_out_images_are_not_trained_on(tiny_model, red_dataset, tmp_path):  # noqa: F811
    config = tiny_config(tiny_model, red_dataset, tmp_path / "run", "schedule.steps=2", "data.eval_fraction=0.5", "evaluation.every=0")
    trainer = Trainer(config, progress=False)
    trainer.setup()
    try:
        trained = {item.latent_key for item in trainer.dataset.main.manifest.items}
        held = {trainer.evaluator.dataset.manifest.items[i].latent_key for i in trainer.evaluator.indices}
        assert held and trained and not held & trained
        first = trainer.evaluate()["eval/loss"]
        assert trainer.evaluate()["eval/loss"] == first, "two evaluations of the same weights differ"
    finally:
        trainer.cleanup()


def test_class_images_come_at_their_ratio_and_weight(tiny_model, red_dataset, blue_dataset, tmp_path):  # noqa: F811
    overrides = ["schedule.steps=2", f"data.extra=[{{path: {blue_dataset}, kind: class, loss_weight: 0.25, ratio: 2.0}}]"]
    trainer = Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "run", *overrides), progress=False)
    trainer.setup()
    try:
        instance, classes = 2, set(trainer.dataset.class_items)
        draws = [draw for batch in trainer.sampler.epoch_batches(0) for draw in batch]
        assert sum(draw in classes for draw in draws) == 2 * instance
        batch = trainer.next_batch()
        expected = [0.25 if i in classes else 1.0 for i in trainer.sampler.epoch_batches(0)[0]]
        assert batch.weights.tolist() == expected
        assert trainer.metadata()["prior_preservation"] == "4 class images, 4 per epoch (ratio 2), loss weight 0.25"
    finally:
        trainer.cleanup()


def test_masked_images_reach_the_loss_with_their_masks(tiny_model, masked_dataset, tmp_path):  # noqa: F811
    trainer = Trainer(tiny_config(tiny_model, masked_dataset, tmp_path / "run", "schedule.steps=2", "data.batch_size=2"), progress=False)
    trainer.setup()
    try:
        assert "3 masked" in trainer.dataset.describe()
        assert trainer.metadata()["masked_images"] == 3
        masks = [trainer.next_batch().loss_masks for _ in range(2)]
        # Each bucket's batch: the left half weighs 1, the right 0 (the unmasked image weighs 1 everywhere).
        for batch_masks in masks:
            assert batch_masks is not None and batch_masks.shape[1] == 1
            left, right = batch_masks[..., : batch_masks.shape[-1] // 2], batch_masks[..., batch_masks.shape[-1] // 2 :]
            assert (left == 1).all()
            assert sorted(float(r.max()) for r in right) in ([0.0, 0.0], [0.0, 1.0])
    finally:
        trainer.cleanup()
