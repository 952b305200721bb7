"""Which DDPM timesteps a training step trains on: uniform, logit-normal or a range.

PixArt-Sigma is trained with epsilon prediction on a 1000-step DDPM schedule where
t = 0 is the least noise and t = T - 1 the most. Every scheme here returns integer
timesteps in [0, T) drawn from an explicit generator, and ``timestep_probabilities``
gives the exact distribution each scheme draws from, so tests (and the docs) can
check a sampler against its law rather than against itself.
"""

from __future__ import annotations

import math

import torch

from pixart_tune.training.config import TIMESTEP_SAMPLING, TimestepSection


def sample_timesteps(
    settings: TimestepSection,
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.LongTensor:
    """Draws ``batch`` integer timesteps in [0, num_train_timesteps) by ``settings.sampling``.

    - uniform: exactly ``torch.randint(0, T, (batch,))`` on the generator, as PixArt
      trains and as this trainer drew before the other schemes existed, so a run
      that keeps the default consumes the same random numbers and stays bit-identical.
    - logit_normal: floor(sigmoid(N(mean, std)) * T), see ``_logit_normal``.
    - range: ``torch.randint`` over [min, max] when ``range_bias`` is null, else
      ``torch.multinomial`` over all T timesteps with those in the range weighing
      ``range_bias`` times the others, see ``_range_probabilities``.

    A range that ends at or past T raises ValueError naming
    ``diffusion.timesteps.range`` (the config alone cannot know T).
    """
    if settings.sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)
    if settings.sampling == "logit_normal":
        return _logit_normal(settings.mean, settings.std, batch, num_train_timesteps, generator, device)
    if settings.sampling == "range":
        low, high = _checked_range(settings, num_train_timesteps)
        if settings.range_bias is None:
            return torch.randint(low, high + 1, (batch,), generator=generator, device=device)
        weights = _range_probabilities(low, high, settings.range_bias, num_train_timesteps)
        # float32: not every accelerator has float64 (MPS); multinomial renormalises anyway.
        return torch.multinomial(weights.to(device=device, dtype=torch.float32), batch, replacement=True, generator=generator)
    raise _unknown(settings.sampling)


def timestep_probabilities(settings: TimestepSection, num_train_timesteps: int) -> torch.Tensor:
    """The exact probability of each timestep 0 .. T-1 under ``settings`` (float64, sums to 1).

    For logit_normal it is the mass the normal puts between the logits of the
    bucket edges k/T and (k+1)/T (see ``_logit_normal``); for range it is the
    categorical ``sample_timesteps`` draws from. Used by the tests and to plot
    the schemes in the docs.
    """
    T = num_train_timesteps
    if settings.sampling == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if settings.sampling == "logit_normal":
        edges = torch.arange(T + 1, dtype=torch.float64) / T
        logits = torch.log(edges) - torch.log1p(-edges)  # -inf at 0, +inf at 1
        cdf = torch.special.ndtr((logits - settings.mean) / settings.std)
        return cdf[1:] - cdf[:-1]
    if settings.sampling == "range":
        low, high = _checked_range(settings, T)
        return _range_probabilities(low, high, settings.range_bias, T)
    raise _unknown(settings.sampling)


def _logit_normal(
    mean: float, std: float, batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.LongTensor:
    """t = floor(sigmoid(z) * T) with z ~ N(mean, std), clamped to [0, T-1].

    The logit-normal density over t/T is SD3's (Esser et al. 2024, "Scaling
    Rectified Flow Transformers for High-Resolution Image Synthesis",
    arXiv:2403.03206, section 3.1), which puts more samples on the middle timesteps
    that are hardest to predict. SD3's t runs 0 = data to 1 = noise, the same way
    as DDPM's index, so sigmoid(z) maps straight onto t/T without a flip: a negative
    mean favours the low-noise (detail) end, a positive one the high-noise
    (composition) end. Flooring makes timestep k the bucket [k/T, (k+1)/T), whose
    probability ``timestep_probabilities`` computes from the normal CDF; the clamp
    only catches sigmoid(z) rounding to exactly 1.0 in float32 (z above ~17), which
    the bucket of T-1 (upper edge +inf in logit space) already owns. OneTrainer
    draws it the same way before its cast to int (Nerogar/OneTrainer
    modules/modelSetup/mixin/ModelSetupNoiseMixin.py, ``_get_timestep_discrete``).

    The shape is over the timestep index, not over log-SNR as in SD3: on PixArt's
    linear betas t = 500 has log-SNR about -2.5 and SNR = 1 falls near t = 260, so
    mean 0 centres the draws on fairly noisy timesteps.
    """
    z = torch.randn((batch,), generator=generator, device=device) * std + mean
    t = torch.floor(torch.sigmoid(z) * num_train_timesteps).long()
    return t.clamp_(0, num_train_timesteps - 1)


def _checked_range(settings: TimestepSection, num_train_timesteps: int) -> tuple[int, int]:
    """The [min, max] of ``diffusion.timesteps.range``, checked against T here because
    the config alone does not know the scheduler's number of timesteps."""
    if settings.range is None:
        raise ValueError("diffusion.timesteps.sampling=range needs diffusion.timesteps.range: [min, max]")
    low, high = int(settings.range[0]), int(settings.range[1])
    if not 0 <= low <= high:
        raise ValueError(f"diffusion.timesteps.range must be [min, max] with 0 <= min <= max, got {[low, high]}")
    if high >= num_train_timesteps:
        raise ValueError(
            f"diffusion.timesteps.range {[low, high]} ends past the last timestep: the scheduler has "
            f"{num_train_timesteps} timesteps (T), so max must be at most {num_train_timesteps - 1}"
        )
    return low, high


def _range_probabilities(low: int, high: int, bias: float | None, num_train_timesteps: int) -> torch.Tensor:
    """The categorical of ``range``: each timestep in [low, high] weighs ``bias``, each
    outside weighs 1 (``bias`` None: only the range, uniformly), then normalised.

    This is SimpleTuner's ``--timestep_bias_strategy range`` (bghira/SimpleTuner
    simpletuner/helpers/training/custom_schedule.py, ``generate_timestep_weights``)
    with one difference: there the end is exclusive (``slice(begin, end)``), here
    both ends are included, as ``diffusion.timesteps.range`` documents.
    """
    inside = torch.zeros(num_train_timesteps, dtype=torch.bool)
    inside[low : high + 1] = True
    if bias is None:
        weights = inside.double()
    else:
        if not (bias > 0 and math.isfinite(bias)):
            raise ValueError(f"diffusion.timesteps.range_bias must be a positive number or null, got {bias}")
        weights = torch.where(inside, torch.tensor(float(bias), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return weights / weights.sum()


def _unknown(sampling: str) -> ValueError:
    """The error for a sampling name the config would have refused (one message for both entry points)."""
    return ValueError(f"diffusion.timesteps.sampling {sampling!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")
