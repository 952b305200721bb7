"""The pure parts of training: diffusion math, bucket batches, optimizers, checkpoints."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from diffusers import DDPMScheduler

from pixart_tune.training import diffusion
from pixart_tune.training.config import OptimSection
from pixart_tune.training.dataset import BucketBatchSampler
from pixart_tune.training.optim import build_optimizer, resolve_name


def test_loss_uses_the_noise_half_and_min_snr_weights():
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    output = torch.randn(3, 8, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    per_sample = ((output[:, :4] - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(diffusion.diffusion_loss(output, noise, timesteps), per_sample.mean())
    abar = scheduler.alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(diffusion.diffusion_loss(output, noise, timesteps, scheduler, 5.0), expected, rtol=1e-5)
    # Changing the variance half must not change the loss.
    output[:, 4:] += 100
    assert torch.allclose(diffusion.diffusion_loss(output, noise, timesteps), per_sample.mean())


def test_noise_offset_shifts_channel_means_and_caption_dropout_uses_the_empty_prompt():
    latents = torch.zeros(64, 4, 16, 16)
    plain = diffusion.sample_noise(latents, torch.Generator().manual_seed(1))
    offset = diffusion.sample_noise(latents, torch.Generator().manual_seed(1), noise_offset=0.5)
    assert plain.mean(dim=(2, 3)).std() < 0.1 < offset.mean(dim=(2, 3)).std()

    embeds, mask = torch.ones(6, 5, 3), torch.ones(6, 5, dtype=torch.long)
    empty, empty_mask = torch.full((300, 3), 7.0), torch.zeros(300, dtype=torch.long)
    empty_mask[0] = 1
    same = diffusion.drop_captions(embeds, mask, empty, empty_mask, 0.0, torch.Generator())
    assert same[0] is embeds
    dropped, dropped_mask = diffusion.drop_captions(embeds, mask, empty, empty_mask, 0.999999, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, torch.full((6, 5, 3), 7.0)) and dropped_mask.sum() == 6


def test_bucket_batches_are_single_bucket_deterministic_and_split_across_ranks():
    buckets = [(256, 256)] * 7 + [(320, 192)] * 5 + [(192, 320)] * 2
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3)
    batches = sampler.rank_batches(0)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(buckets)))
    assert batches == BucketBatchSampler(buckets, batch_size=2, seed=3).rank_batches(0)
    assert batches != sampler.rank_batches(1)
    sampler.set_epoch(0, start=3)
    assert list(sampler) == batches[3:]

    ranks = [BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=r).rank_batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not {tuple(b) for b in ranks[0]} & {tuple(b) for b in ranks[1]}


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "adamw", "lion8bit", "lion", "adafactor", "sgd"])
def test_every_optimizer_steps(name):
    weight = torch.nn.Parameter(torch.ones(64, 64))
    optimizer = build_optimizer([weight], OptimSection(name=name, lr=1e-2), torch.device("cpu"))
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert weight.detach().mean() < 1.0


def test_missing_bitsandbytes_falls_back_to_adamw_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like
    monkeypatch.setattr("pixart_tune.training.optim._warned", set())
    with caplog.at_level(logging.WARNING):
        assert resolve_name("adamw8bit", torch.device("cpu")) == "adamw"
        assert resolve_name("adamw8bit", torch.device("cpu")) == "adamw"
        optimizer = build_optimizer([torch.nn.Parameter(torch.ones(3))], OptimSection(), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert sum("bitsandbytes" in r.message for r in caplog.records) == 1
