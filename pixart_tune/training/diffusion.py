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


def diffusion_loss(
    model_output: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler=None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between predicted and true noise, per sample, optionally min-SNR weighted.

    Computed in fp32 whatever the model's dtype, so a bf16 forward does not round
    the loss and its gradient.
    """
    pred = noise_prediction(model_output, noise.shape[1]).float()
    per_sample = (pred - noise.float()).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)
    return per_sample.mean()
