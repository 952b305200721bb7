"""Timestep sampling schemes against their laws, loss weights against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from pixart_tune.training.config import TimestepSection
from pixart_tune.training.timesteps import sample_timesteps, timestep_probabilities
from pixart_tune.training.weighting import DEBIASED_SNR_CLAMP, loss_weights, snr

T = 1000
DRAWS = 20_000
CPU = torch.device("cpu")


def draw(settings: TimestepSection, n: int = DRAWS, seed: int = 0) -> torch.Tensor:
    return sample_timesteps(settings, n, T, torch.Generator().manual_seed(seed), CPU)


def chi_square(samples: torch.Tensor, pmf: torch.Tensor, width: int = 25) -> tuple[float, int]:
    """Pearson's statistic of the draws against ``pmf`` over bins of ``width`` timesteps
    (bins expecting fewer than 5 draws pooled into one), and its degrees of freedom."""
    observed = torch.bincount(samples, minlength=T).double().reshape(-1, width).sum(1)
    expected = (pmf * samples.numel()).reshape(-1, width).sum(1)
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    assert observed[~keep].sum() == 0, "draws where the law puts no mass"
    observed, expected = observed[keep], expected[keep]
    return ((observed - expected) ** 2 / expected).sum().item(), int(keep.sum()) - 1


def fits(samples: torch.Tensor, pmf: torch.Tensor) -> bool:
    """Chi-square goodness of fit: the bound df + 4 sqrt(2 df) rejects a correct
    sampler with probability under 0.3% at 7 degrees of freedom and under 0.1% at
    39 (the range used here); the seeds are fixed, so the tests are deterministic."""
    statistic, df = chi_square(samples, pmf)
    return statistic < df + 4 * math.sqrt(2 * df)


def test_uniform_is_exactly_torch_randint_on_the_same_generator():
    settings = TimestepSection()
    for batch in (1, 4, 17):
        ours = sample_timesteps(settings, batch, T, torch.Generator().manual_seed(3), CPU)
        theirs = torch.randint(0, T, (batch,), generator=torch.Generator().manual_seed(3), device=CPU)
        assert torch.equal(ours, theirs) and ours.dtype == torch.long
    # ... and leaves the generator where randint leaves it, so later draws match too.
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sample_timesteps(settings, 8, T, a, CPU)
    torch.randint(0, T, (8,), generator=b)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert torch.allclose(timestep_probabilities(settings, T), torch.full((T,), 1 / T, dtype=torch.float64))


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 1.0), (0.8, 0.6), (0.0, 1.6)])
def test_logit_normal_moments_and_histogram(mean, std):
    settings = TimestepSection(sampling="logit_normal", mean=mean, std=std)
    t = draw(settings)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= T - 1
    # Undo the mapping at each bucket's centre: logit((t + 0.5) / T) recovers z up to
    # the bucket width, which only matters in the far tails.
    z = torch.logit((t.double() + 0.5) / T)
    assert abs(z.mean().item() - mean) < 0.04 + 0.02 * std
    assert abs(z.std().item() - std) < 0.04 * std + 0.01
    pmf = timestep_probabilities(settings, T)
    assert abs(pmf.sum().item() - 1) < 1e-12 and (pmf >= 0).all()
    assert fits(t, pmf)
    # The check has the power to see a law off by a little: a mean 0.15 away fails it.
    assert not fits(t, timestep_probabilities(TimestepSection(sampling="logit_normal", mean=mean + 0.15, std=std), T))


def test_logit_normal_mean_moves_draws_toward_the_noisy_end():
    # PixArt's t = 0 is the least noise: a positive mean must mean more noise.
    low = draw(TimestepSection(sampling="logit_normal", mean=-1.0)).double().mean()
    high = draw(TimestepSection(sampling="logit_normal", mean=1.0)).double().mean()
    assert low < T / 2 < high


def test_logit_normal_pmf_is_the_normal_cdf_between_bucket_logits():
    pmf = timestep_probabilities(TimestepSection(sampling="logit_normal", mean=0.3, std=0.7), T)
    phi = lambda x: 0.5 * (1 + math.erf((x - 0.3) / (0.7 * math.sqrt(2))))  # noqa: E731
    for k in (0, 1, 250, 500, 998):
        expected = phi(math.log((k + 1) / (T - k - 1))) - (phi(math.log(k / (T - k))) if k else 0.0)
        assert pmf[k].item() == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert pmf[T - 1].item() == pytest.approx(1 - phi(math.log((T - 1) / 1)), rel=1e-9)
    # Symmetric about the middle when the mean is 0.
    sym = timestep_probabilities(TimestepSection(sampling="logit_normal"), T)
    assert torch.allclose(sym, sym.flip(0), atol=1e-15)


def test_range_without_bias_stays_in_the_range_uniformly():
    settings = TimestepSection(sampling="range", range=(200, 399))
    t = draw(settings)
    assert int(t.min()) >= 200 and int(t.max()) <= 399
    assert {200, 399} <= set(t.tolist())  # both ends included
    pmf = timestep_probabilities(settings, T)
    assert torch.allclose(pmf[200:400], torch.full((200,), 1 / 200, dtype=torch.float64)) and pmf[:200].sum() == 0
    assert fits(t, pmf)
    single = draw(TimestepSection(sampling="range", range=(7, 7)), n=50)
    assert (single == 7).all()


@pytest.mark.parametrize("bias", [4.0, 0.25])
def test_range_with_bias_weighs_each_inside_timestep_b_times(bias):
    settings = TimestepSection(sampling="range", range=(0, 399), range_bias=bias)
    t = draw(settings, n=40_000)
    inside = (t <= 399).double()
    per_timestep_ratio = (inside.sum() / 400) / ((1 - inside).sum() / 600)
    assert per_timestep_ratio.item() == pytest.approx(bias, rel=0.06)
    pmf = timestep_probabilities(settings, T)
    assert pmf[0].item() / pmf[999].item() == pytest.approx(bias) and pmf.sum().item() == pytest.approx(1)
    assert fits(t, pmf)
    # ... and the check tells it from a sampler that made them 1/b as likely.
    assert not fits(t, timestep_probabilities(TimestepSection(sampling="range", range=(0, 399), range_bias=1 / bias), T))


def test_range_with_bias_is_reproducible_from_the_generator():
    settings = TimestepSection(sampling="range", range=(100, 199), range_bias=3.0)
    assert torch.equal(draw(settings, n=64, seed=9), draw(settings, n=64, seed=9))
    assert not torch.equal(draw(settings, n=64, seed=9), draw(settings, n=64, seed=10))


def test_a_range_past_the_schedule_names_the_key_and_T():
    settings = TimestepSection(sampling="range", range=(500, 1000))
    with pytest.raises(ValueError, match=r"diffusion\.timesteps\.range.*1000"):
        draw(settings, n=1)
    with pytest.raises(ValueError, match=r"diffusion\.timesteps\.range"):
        timestep_probabilities(settings, T)
    # The same range fits a longer schedule.
    assert int(sample_timesteps(settings, 4, 2000, torch.Generator().manual_seed(0), CPU).max()) <= 1000


def test_bad_timestep_settings_name_their_key():
    for kwargs, key in [
        ({"sampling": "cosine"}, "diffusion.timesteps.sampling"),
        ({"sampling": "logit_normal", "std": 0.0}, "diffusion.timesteps.std"),
        ({"sampling": "range"}, "diffusion.timesteps.range"),
        ({"sampling": "range", "range": (300, 200)}, "diffusion.timesteps.range"),
        ({"sampling": "range", "range": (0, 9), "range_bias": 0.0}, "diffusion.timesteps.range_bias"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            TimestepSection(**kwargs)


# --- loss weights on PixArt-Sigma's schedule (linear betas 1e-4 .. 0.02, 1000 steps) ---

@pytest.fixture(scope="module")
def schedule():
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=T)
    timesteps = torch.tensor([0, 3, 10, 50, 129, 130, 260, 500, 750, 999])
    abar = scheduler.alphas_cumprod[timesteps].double()
    return scheduler, timesteps, abar / (1 - abar)


def test_snr_is_abar_over_one_minus_abar(schedule):
    scheduler, timesteps, expected = schedule
    assert torch.allclose(snr(scheduler, timesteps).double(), expected, rtol=1e-5)


def test_weights_match_their_formulas(schedule):
    _, _, s = schedule
    gamma, k, p = 5.0, 1.0, 0.5
    expected = {
        "none": torch.ones_like(s),
        "min_snr": torch.minimum(s, torch.full_like(s, gamma)) / s,
        "soft_min_snr": (1 / (1 / s + 1 / gamma)) / s,  # HDiT's soft min on x0, over SNR for eps
        "debiased": 1 / torch.sqrt(torch.minimum(s, torch.full_like(s, 1000.0))),
        "p2": (k + s) ** -p,
    }
    for name, want in expected.items():
        got = loss_weights(name, s, gamma=gamma, p2_k=k, p2_gamma=p)
        assert got.shape == s.shape and torch.allclose(got, want, rtol=1e-10), name


def test_weight_limits(schedule):
    _, timesteps, s = schedule
    # p2 with gamma 0 is no weighting, whatever k.
    assert torch.equal(loss_weights("p2", s, p2_k=3.0, p2_gamma=0.0), torch.ones_like(s))
    # min_snr is exactly 1 wherever SNR <= gamma (all the noisy timesteps), < 1 elsewhere.
    w = loss_weights("min_snr", s, gamma=5.0)
    assert torch.equal(w[s <= 5.0], torch.ones_like(w[s <= 5.0])) and (w[s > 5.0] < 1).all()
    assert (s <= 5.0).tolist() == (timesteps >= 130).tolist()
    # soft_min_snr lies between half of min_snr and min_snr (a soft minimum), reaches
    # 1 at the noisy end and gamma / SNR at the clean end.
    soft = loss_weights("soft_min_snr", s, gamma=5.0)
    assert (soft <= w).all() and (soft >= w / 2).all()
    assert soft[-1].item() == pytest.approx(1.0, abs=1e-4)
    assert soft[0].item() == pytest.approx(5.0 / s[0].item(), rel=1e-3)
    # debiased is capped where SNR > 1000 (t < 6 here) and 1/sqrt(SNR) elsewhere.
    d = loss_weights("debiased", s)
    assert d[0].item() == d[1].item() == pytest.approx(1 / math.sqrt(DEBIASED_SNR_CLAMP))
    assert d[2].item() == pytest.approx(1 / math.sqrt(s[2].item()))
    # Every scheme down-weights the clean end relative to the noisy end.
    for name in ("min_snr", "soft_min_snr", "debiased", "p2"):
        weights = loss_weights(name, s)
        assert weights[0] < weights[-1], name


def test_weights_keep_dtype_and_device_of_snr():
    s = torch.tensor([0.5, 50.0], dtype=torch.float32)
    for name in ("none", "min_snr", "soft_min_snr", "debiased", "p2"):
        out = loss_weights(name, s)
        assert out.dtype == torch.float32 and out.device == s.device, name


def test_bad_weighting_values_name_their_key():
    s = torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"diffusion\.weighting"):
        loss_weights("snr", s)
    for name in ("min_snr", "soft_min_snr"):
        with pytest.raises(ValueError, match=r"diffusion\.min_snr_gamma"):
            loss_weights(name, s, gamma=0.0)
    with pytest.raises(ValueError, match=r"diffusion\.p2_k"):
        loss_weights("p2", s, p2_k=0.0)
    with pytest.raises(ValueError, match=r"diffusion\.p2_gamma"):
        loss_weights("p2", s, p2_gamma=-1.0)
