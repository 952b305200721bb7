"""The training loss of one batch, from the recipe's diffusion and data settings.

One micro-step draws timesteps (the recipe's sampling scheme), noise (with its
offset) and caption dropout from one generator, runs the transformer, and weighs
each sample's (masked) noise error by its timestep weighting and its dataset's loss
weight. The pure math lives in :mod:`diffusion`, :mod:`timesteps` and
:mod:`weighting`; this class only holds what they need.
"""

from __future__ import annotations

from typing import Callable

import torch

from pixart_tune.training import diffusion
from pixart_tune.training.config import DataSection, DiffusionSection
from pixart_tune.training.dataset import Batch
from pixart_tune.training.timesteps import sample_timesteps
from pixart_tune.training.weighting import loss_weights

# PixArt-Sigma's checkpoints take no resolution / aspect-ratio micro-conditions.
NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def no_conditions(height: int, width: int, batch: int, device, dtype) -> dict:
    return NO_MICRO_CONDITIONS


class TrainingLoss:
    """Loss of batches for ``model`` (the transformer, DDP-wrapped or not) under ``noise_scheduler``."""

    def __init__(
        self,
        settings: DiffusionSection,
        data: DataSection,
        noise_scheduler,
        dtype: torch.dtype,
        empty: tuple[torch.Tensor, torch.Tensor],
        conditions: Callable[..., dict] = no_conditions,
    ):
        """``conditions(height, width, batch, device, dtype)``: the micro-conditions of a batch
        of that pixel size, as the model family's pipeline passes them (``Family.micro_conditions``)."""
        self.settings, self.data, self.conditions = settings, data, conditions
        self.noise_scheduler, self.dtype = noise_scheduler, dtype
        self.empty_embeds, self.empty_mask = empty
        self.num_timesteps = noise_scheduler.config.num_train_timesteps
        # A range beyond the schedule is refused now, not at the first step.
        sample_timesteps(settings.timesteps, 1, self.num_timesteps, torch.Generator(), torch.device("cpu"))

    def batch_loss(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Noise, timesteps and caption dropout drawn from ``generator``; the weighted mean loss."""
        latents = batch.latents
        noise = diffusion.sample_noise(latents, generator, self.settings.noise_offset)
        timesteps = sample_timesteps(self.settings.timesteps, latents.shape[0], self.num_timesteps, generator, latents.device)
        embeds, mask = diffusion.drop_captions(
            batch.embeds, batch.mask, self.empty_embeds, self.empty_mask, self.data.caption_dropout, generator
        )
        return self.loss(model, latents, noise, timesteps, embeds, mask, batch.weights, batch.loss_masks)

    def loss(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        weights: torch.Tensor | None = None,
        loss_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted mean loss of given latents, noise, timesteps and text (no randomness)."""
        per_sample = self.per_sample(model, latents, noise, timesteps, embeds, mask, loss_masks)
        per_sample = per_sample * self.timestep_weights(timesteps)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()

    def per_sample(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        loss_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B] unweighted noise error of each sample (masked where masks are given)."""
        noisy = diffusion.add_noise(self.noise_scheduler, latents, noise, timesteps).to(self.dtype)
        # PixArt-alpha's 1024 model sees the image's size: the bucket's, in pixels (8 per latent).
        added = self.conditions(latents.shape[-2] * 8, latents.shape[-1] * 8, latents.shape[0], latents.device, self.dtype)
        output = model(
            noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
            added_cond_kwargs=added, return_dict=False,
        )[0]
        return diffusion.per_sample_mse(output, noise, loss_masks, self.data.mask_floor)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | float:
        """The recipe's per-timestep weighting (1 for none, without computing any SNR)."""
        name = self.settings.loss_weighting
        if name == "none":
            return 1.0
        if name == "min_snr":  # the function min-SNR runs have always used: same values, bit for bit
            return diffusion.min_snr_weights(self.noise_scheduler, timesteps, self.settings.gamma)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        return loss_weights(name, snr, gamma=self.settings.gamma, p2_k=self.settings.p2_k, p2_gamma=self.settings.p2_gamma)
