"""The trainer end to end on the tiny model: loss, learning, saved adapter, bad input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pixart_tune import __version__
from pixart_tune.data.cache import FeatureCache
from pixart_tune.errors import UserError
from pixart_tune.models import load_pipeline, load_transformer
from pixart_tune.training import checkpoint as ckpt
from pixart_tune.training.trainer import Trainer, run
from tests.adapter_fixtures import peft_load
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (fixture)

# Strong enough to over-fit six flat images in a few dozen steps on the tiny model.
OVERFIT = ["schedule.steps=60", "optim.lr=1e-2", "data.caption_dropout=0", "diffusion.min_snr_gamma=null",
           "lora.targets=all_linear", "lora.rank=8", "lora.alpha=8", "checkpoint.every=0", "logging.every=20"]


@pytest.fixture(scope="module")
def trained(tiny_model, red_dataset, tmp_path_factory):
    """A trainer after an over-fitting run (kept set up, so its model can be compared)."""
    config = tiny_config(tiny_model, red_dataset, tmp_path_factory.mktemp("run") / "out", *OVERFIT)
    trainer = Trainer(config, progress=False)
    trainer.setup()
    batch = trainer.next_batch()
    fixed = _fixed_draws(batch, trainer)
    before = trainer.loss_for(batch.latents, *fixed).item()
    adapter = trainer.train()
    after = trainer.loss_for(batch.latents, *fixed).item()
    yield trainer, adapter, before, after
    trainer.cleanup()


def _fixed_draws(batch, trainer):
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(batch.latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(batch),), generator=generator)
    return noise, timesteps, batch.embeds, batch.mask


def test_one_step_loss_equals_the_formula(tiny_model, red_dataset, tmp_path):
    config = tiny_config(tiny_model, red_dataset, tmp_path / "out", "diffusion.min_snr_gamma=5.0")
    trainer = Trainer(config, progress=False)
    trainer.setup()
    batch = trainer.next_batch()
    noise, timesteps, embeds, mask = _fixed_draws(batch, trainer)
    loss = trainer.loss_for(batch.latents, noise, timesteps, embeds, mask)

    # Independently: DDPM forward process from the betas of the model folder's
    # scheduler config, the noise half of the 8-channel output, min-SNR-5 weights.
    schedule = json.loads((Path(tiny_model) / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["beta_schedule"] == "linear"
    betas = torch.linspace(schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[timesteps].float()[:, None, None, None]
    noisy = abar.sqrt() * batch.latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        output = trainer.transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert output.shape[1] == 8
    per_sample = ((output[:, :4] - noise) ** 2).mean(dim=(1, 2, 3))
    snr = abar.flatten() / (1 - abar.flatten())
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7), (loss.item(), expected.item())
    trainer.cleanup()


def test_training_lowers_the_loss_and_learns_the_colour(trained, tiny_model, red_dataset):
    trainer, adapter, before, after = trained
    assert after < 0.7 * before, (before, after)
    # Samples with the adapter land much nearer the training latents than the base
    # model's samples from the same seeds and prompt.
    cache = FeatureCache(red_dataset)
    manifest = cache.read_manifest()
    target = torch.stack([cache.read_latent(i.latent_key) for i in manifest.items if tuple(i.bucket) == (256, 256)]).mean(0)
    pipe = load_pipeline(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = _sample_latents(pipe)
    peft_load(pipe.transformer, adapter)
    tuned = _sample_latents(pipe)
    base_distance = (base - target).pow(2).mean().item()
    tuned_distance = (tuned - target).pow(2).mean().item()
    assert tuned_distance < 0.5 * base_distance, (base_distance, tuned_distance)


def _sample_latents(pipe) -> torch.Tensor:
    return torch.cat([
        pipe(prompt="a flat red colour 0", num_inference_steps=10, height=256, width=256, output_type="latent",
             generator=torch.Generator().manual_seed(seed), use_resolution_binning=False, clean_caption=False).images
        for seed in (0, 1, 2)
    ])


def test_saved_adapter_reproduces_the_trained_model_and_holds_metadata(trained, tiny_model):
    trainer, adapter, _, _ = trained
    fresh = peft_load(load_transformer(tiny_model), adapter)
    generator = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 32, 32, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=generator),
        encoder_attention_mask=torch.ones(2, 7, dtype=torch.long),
        timestep=torch.tensor([10, 700]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    trainer.transformer.eval()
    with torch.no_grad():
        assert torch.equal(trainer.transformer(**inputs).sample, fresh(**inputs).sample)
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    assert header["base_model"] == tiny_model
    assert header["lora_rank"] == "8" and header["lora_alpha"] == "8.0" and header["lora_targets"] == "all_linear"
    assert json.loads(header["steps"]) == 60 and json.loads(header["resolution"]) == 256
    assert json.loads(header["trigger_words"]) == []
    assert header["dataset_fingerprint"] == trainer.dataset_fingerprint and len(header["dataset_fingerprint"]) == 32
    assert header["pixart_tune_version"] == __version__
    assert (trainer.config.output_dir / "config.yaml").is_file()


def test_checkpoints_keep_the_last_k_and_carry_the_config(tiny_model, red_dataset, tmp_path):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, red_dataset, out, "schedule.steps=5", "checkpoint.every=1", "checkpoint.keep_last=2"), progress=False)
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["step-000003", "step-000004"]
    assert (kept[-1] / "config.yaml").read_text().startswith("model:")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    checkpoint = ckpt.load_checkpoint(kept[-1])
    assert checkpoint.state.step == 4 and checkpoint.state.batch_in_epoch + checkpoint.state.epoch > 0
    assert checkpoint.grad_scaler is None and not (kept[-1] / "grad_scaler.pt").exists(), "no loss scaler outside fp16"


def test_the_fp16_loss_scale_travels_with_the_checkpoint(tiny_model, red_dataset, tmp_path):
    """fp16 needs a GPU here, so the scaler's state is checked at the checkpoint's level, with a real GradScaler."""
    trainer = Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "out"), progress=False)
    trainer.setup()
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        scaler.scale(torch.ones(()))  # the scale is made lazily, on first use
        scaler.update(2.0**11)  # the scale a run has settled on
        path = ckpt.save_checkpoint(
            tmp_path / "out", transformer=trainer.transformer, lora=trainer.lora, metadata=trainer.metadata(), optimizer=trainer.optimizer,
            lr_scheduler=trainer.lr_scheduler, state=trainer.state, rng=[ckpt.rng_state()], config=trainer.config, keep_last=1,
            grad_scaler=scaler.state_dict(),
        )
    finally:
        trainer.cleanup()
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(ckpt.load_checkpoint(path).grad_scaler)
    assert restored.get_scale() == 2.0**11


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model, red_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = tiny_config(tiny_model, red_dataset, out, "schedule.steps=4", "checkpoint.every=1")
    real_save = torch.save
    calls = []

    def save_until_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint's first file: half written, then the disk is full
            with open(path, "wb") as file:
                file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(UserError, match="disk is full.*step-000001.*intact.*--resume"):
        run(config, progress=False)
    monkeypatch.undo()
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["step-000001"]
    assert ckpt.load_checkpoint(kept[0]).state.step == 1
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step-000001"]
    # ... and the run continues from it once there is space again.
    run(tiny_config(tiny_model, red_dataset, out, "schedule.steps=4", "checkpoint.every=1"), resume="latest", progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_without_touching_saved_work(tiny_model, red_dataset, tmp_path):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, red_dataset, out, "schedule.steps=2", "checkpoint.every=1"), progress=False)
    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    poisoned = tmp_path / "poisoned"
    shutil.copytree(red_dataset, poisoned)
    cache = FeatureCache(poisoned)
    for item in cache.read_manifest().items:
        cache.write_latent(item.latent_key, torch.full_like(cache.read_latent(item.latent_key), float("nan")))
    config = tiny_config(tiny_model, poisoned, out, "schedule.steps=4", "checkpoint.every=1", "logging.every=1")
    with pytest.raises(UserError, match="NaN.*step-000001"):
        run(config, resume="latest", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001"]
    assert ckpt.load_checkpoint(out / "checkpoints" / "step-000001").state.step == 1
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes


def _edit_manifest(src, dst, **changes):
    shutil.copytree(src, dst)
    data = json.loads((dst / "dataset.json").read_text())
    data.update(changes)
    (dst / "dataset.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"caption_channels": 4096}, "text embeddings have 4096 channels, the transformer takes 32.*prepare"),
        ({"latent_channels": 16}, "latents have 16 channels, the transformer takes 4"),
        ({"resolution": 512}, "trains at 256 px but .* was prepared at 512 px"),
    ],
)
def test_dataset_that_does_not_fit_the_model_is_refused(tiny_model, red_dataset, tmp_path, change, message):
    data = _edit_manifest(red_dataset, tmp_path / "data", **change)
    with pytest.raises(UserError, match=message):
        Trainer(tiny_config(tiny_model, data, tmp_path / "out"), progress=False).setup()
    assert not (tmp_path / "out").exists(), "a refused run wrote its output_dir"


def test_missing_cache_and_missing_resume_are_clear_errors(tiny_model, red_dataset, tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset.*prepare"):
        Trainer(tiny_config(tiny_model, tmp_path / "nothing", tmp_path / "a"), progress=False).setup()
    data = tmp_path / "data"
    shutil.copytree(red_dataset, data)
    next((data / "latents").iterdir()).unlink()
    with pytest.raises(UserError, match="1 cache file.*missing.*prepare"):
        Trainer(tiny_config(tiny_model, data, tmp_path / "b"), progress=False).setup()
    with pytest.raises(UserError, match="no checkpoint under"):
        Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "c"), resume="latest", progress=False).setup()
    with pytest.raises(UserError, match="no such checkpoint folder"):
        Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "c"), resume=str(tmp_path / "step-000009"), progress=False).setup()
    for refused in "abc":
        assert not (tmp_path / refused).exists(), f"the refused run {refused} wrote its output_dir"


def test_a_finished_run_is_not_overwritten_and_init_adapter_must_match(tiny_model, red_dataset, tmp_path):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, red_dataset, out, "schedule.steps=2", "checkpoint.every=1"), progress=False)
    with pytest.raises(UserError, match="already holds checkpoints.*--resume latest"):
        Trainer(tiny_config(tiny_model, red_dataset, out), progress=False).setup()
    # A run saved without checkpoints (checkpoint.every=0) leaves only its adapter: that is kept too.
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(UserError, match="finished run's adapter/.*choose another output_dir"):
        Trainer(tiny_config(tiny_model, red_dataset, out), progress=False).setup()
    with pytest.raises(UserError, match="does not match the lora section: rank=32 \\(recipe: 8\\)"):
        Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "two", f"init_adapter={out / 'adapter'}", "lora.rank=8"), progress=False).setup()
    assert not (tmp_path / "two").exists()
    # A matching stage 2 starts from stage 1's weights.
    stage2 = Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "two", f"init_adapter={out / 'adapter'}"), progress=False)
    stage2.setup()
    fresh = peft_load(load_transformer(tiny_model), out / "adapter")
    assert torch.equal(
        stage2.transformer.transformer_blocks[0].attn1.to_q.lora_B["default"].weight,
        fresh.transformer_blocks[0].attn1.to_q.lora_B["default"].weight,
    )
    stage2.cleanup()
