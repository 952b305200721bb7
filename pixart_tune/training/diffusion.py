"""The diffusion math of one PixArt-Sigma training step, as pure functions.

PixArt-Sigma is trained with epsilon prediction on the DDPM schedule of its
``scheduler/`` config; its transformer outputs 8 channels (4 of noise, 4 of learned
variance), and only the noise half enters the MSE. Nothing here holds state: the
trainer and the tests call the same functions with explicit generators.
"""

from __future__ import annotations

import torch

from diffusers.training_utils import compute_snr


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), as PixArt trains."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, with an optional per-channel offset.

    The offset (a constant per sample and channel) lets the model shift an image's
    mean brightness, which zero-mean noise at high t never asks it to learn.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        noise = noise + noise_offset * torch.randn(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return noise


def add_noise(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (the DDPM forward process)."""
    return noise_scheduler.add_noise(latents, noise, timesteps)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR_t, gamma) / SNR_t for epsilon prediction.

    (Hang et al. 2023.) Down-weights the easy low-noise timesteps whose large SNR
    otherwise dominates the gradient.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr


def drop_captions(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    empty_embeds: torch.Tensor,
    empty_mask: torch.Tensor,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces each sample's caption by the empty prompt with ``probability``.

    ``empty_embeds`` / ``empty_mask`` are the cached T5 output of "" ([T, D] / [T]),
    so the model learns the unconditional prediction classifier-free guidance uses.
    """
    if probability <= 0:
        return embeds, mask
    drop = torch.rand(embeds.shape[0], generator=generator, device=embeds.device) < probability
    length = embeds.shape[1]
    empty_embeds = empty_embeds[:length].to(embeds.dtype)
    empty_mask = empty_mask[:length].to(mask.dtype)
    embeds = torch.where(drop[:, None, None], empty_embeds[None], embeds)
    mask = torch.where(drop[:, None], empty_mask[None], mask)
    return embeds, mask


def noise_prediction(model_output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """The epsilon half of a learned-sigma output (first ``latent_channels`` channels)."""
    if model_output.shape[1] == 2 * latent_channels:
        return model_output.chunk(2, dim=1)[0]
    return model_output


def per_sample_mse(
    model_output: torch.Tensor, noise: torch.Tensor, loss_masks: torch.Tensor | None = None, mask_floor: float = 0.0
) -> torch.Tensor:
    """[B] mean squared error between predicted and true noise, masked where given.

    Computed in fp32 whatever the model's dtype, so a bf16 forward does not round
    the loss and its gradient. With ``loss_masks`` ([B, 1, h, w] in [0, 1]) each
    latent pixel weighs ``mask_floor + (1 - mask_floor) * mask`` and the error is
    averaged over that weight, so a small subject's loss is as large as a large
    one's (the learning rate does not shrink with the mask's area), and with a floor
    of 0 nothing outside the mask reaches the gradient.
    """
    pred = noise_prediction(model_output, noise.shape[1]).float()
    error = (pred - noise.float()).pow(2)
    if loss_masks is None:
        return error.mean(dim=(1, 2, 3))
    weight = mask_floor + (1.0 - mask_floor) * loss_masks.float()
    total = (error * weight).sum(dim=(1, 2, 3))
    # An all-black mask with no floor weighs nothing: its sample's loss is 0, not NaN.
    return total / (weight.sum(dim=(1, 2, 3)) * error.shape[1]).clamp_min(1e-8)


def diffusion_loss(
    model_output: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler=None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between predicted and true noise, per sample, optionally min-SNR weighted, then averaged."""
    per_sample = per_sample_mse(model_output, noise)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)
    return per_sample.mean()
