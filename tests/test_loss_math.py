"""The training loss's own math: masks, per-sample weights and timestep weights, on real tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from pixart_tune.training import diffusion
from pixart_tune.training.config import DataSection, DiffusionSection, TimestepSection
from pixart_tune.training.loss import TrainingLoss
from pixart_tune.training.weighting import loss_weights


class _Output(torch.nn.Module):
    """A 'model' whose output is a free tensor: the loss's gradient with respect to it is what is tested."""

    def __init__(self, shape):
        super().__init__()
        self.value = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, noisy, **_):
        return (self.value,)


def _loss(floor: float = 0.0, **diffusion_keys) -> TrainingLoss:
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    return TrainingLoss(DiffusionSection(**diffusion_keys), DataSection(mask_floor=floor), scheduler, torch.float32, (torch.zeros(4, 8), torch.ones(4)))


def _inputs(batch=2, channels=4, size=8):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, channels, size, size, generator=generator)
    noise = torch.randn(batch, channels, size, size, generator=generator)
    return latents, noise, torch.tensor([10, 700]), torch.randn(batch, 3, 8), torch.ones(batch, 3)


def test_a_zero_mask_gives_zero_gradient_outside_it():
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 8, 8, 8))  # learned sigma: 8 channels, the noise half enters the loss
    loss_masks = torch.zeros(2, 1, 8, 8)
    loss_masks[:, :, :, :3] = 1.0  # train the left three columns only
    _loss(floor=0.0).loss(model, latents, noise, timesteps, embeds, mask, loss_masks=loss_masks).backward()
    grad = model.value.grad[:, :4]
    assert (grad[..., 3:] == 0).all(), "pixels outside the mask reached the gradient"
    assert (grad[..., :3] != 0).all()
    assert (model.value.grad[:, 4:] == 0).all(), "the variance half is not trained"


def test_a_floor_weighs_outside_the_mask_by_it():
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 4, 8, 8))
    loss_masks = torch.zeros(2, 1, 8, 8)
    loss_masks[..., :4] = 1.0
    _loss(floor=0.1).loss(model, latents, noise, timesteps, embeds, mask, loss_masks=loss_masks).backward()
    grad = model.value.grad
    error = model.value.detach() - noise
    # d/dx of w * (x - n)^2 is 2 w (x - n): the ratio of gradient to error is the pixel's weight.
    ratio = grad / error
    torch.testing.assert_close(ratio[..., 4:] / ratio[..., :4], torch.full_like(ratio[..., 4:], 0.1))


def test_an_all_ones_mask_is_the_unmasked_loss_and_a_black_one_is_zero_not_nan():
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 4, 8, 8))
    loss = _loss(floor=0.0)
    plain = loss.per_sample(model, latents, noise, timesteps, embeds, mask)
    ones = loss.per_sample(model, latents, noise, timesteps, embeds, mask, torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(ones, plain)
    black = loss.per_sample(model, latents, noise, timesteps, embeds, mask, torch.zeros(2, 1, 8, 8))
    assert torch.equal(black, torch.zeros(2))


def test_sample_weights_scale_each_sample():
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 4, 8, 8))
    loss = _loss()
    per_sample = loss.per_sample(model, latents, noise, timesteps, embeds, mask)
    weighted = loss.loss(model, latents, noise, timesteps, embeds, mask, weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weighted, per_sample[0] / 2)


@pytest.mark.parametrize("name", ["soft_min_snr", "debiased", "p2"])
def test_the_recipe_weighting_multiplies_each_sample(name):
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 4, 8, 8))
    loss = _loss(weighting=name, min_snr_gamma=4.0, p2_gamma=0.5)
    per_sample = loss.per_sample(model, latents, noise, timesteps, embeds, mask)
    from diffusers.training_utils import compute_snr

    expected = (per_sample * loss_weights(name, compute_snr(loss.noise_scheduler, timesteps), gamma=4.0, p2_gamma=0.5)).mean()
    torch.testing.assert_close(loss.loss(model, latents, noise, timesteps, embeds, mask), expected)


def test_min_snr_is_the_loss_min_snr_runs_always_had():
    latents, noise, timesteps, embeds, mask = _inputs()
    model = _Output((2, 4, 8, 8))
    loss = _loss(min_snr_gamma=5.0)
    output = model(None)[0]
    before = diffusion.diffusion_loss(output, noise, timesteps, loss.noise_scheduler, 5.0)
    assert torch.equal(loss.loss(model, latents, noise, timesteps, embeds, mask), before)


def test_a_timestep_range_past_the_schedule_is_refused_before_training():
    with pytest.raises(ValueError, match="diffusion.timesteps.range"):
        _loss(timesteps=TimestepSection(sampling="range", range=(0, 1000)))
