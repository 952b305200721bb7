"""Per-timestep weights of PixArt-Sigma's epsilon-prediction loss, as functions of SNR.

Every scheme here is written for the loss PixArt trains, the per-sample MSE
||eps_hat - eps||^2 on a DDPM schedule, with SNR_t = abar_t / (1 - abar_t) from the
scheduler's ``alphas_cumprod``. Papers often state a weight for another target;
the conversion used throughout is

    ||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR_t

(x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), so an error in eps becomes one in
x0 scaled by 1 / sqrt(SNR_t)). A weight w_x0 on the x0 loss is therefore the weight
w_x0 / SNR_t on the epsilon loss. Weights multiply each sample's loss; none of them
is normalised, so they change the loss's scale (and the useful learning rate).
"""

from __future__ import annotations

import torch

from diffusers.training_utils import compute_snr

from pixart_tune.training.config import LOSS_WEIGHTING

DEBIASED_SNR_CLAMP = 1000.0
"""debiased: SNR is capped here before 1 / sqrt(SNR), as kohya-ss/sd-scripts does
(``apply_debiased_estimation``): on PixArt's schedule it only touches t = 0 .. 5
(SNR 9997 .. 1112), where it keeps the weight at 1/sqrt(1000) instead of letting it
fall to 0.01, and it keeps the weight finite on a schedule whose SNR at t = 0 is inf."""


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for each timestep, in float32 (diffusers' ``compute_snr``)."""
    return compute_snr(noise_scheduler, timesteps)


def loss_weights(
    name: str,
    snr: torch.Tensor,
    *,
    gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> torch.Tensor:
    """Per-sample weights of the epsilon-prediction MSE for the scheme ``name``.

    ``snr`` holds SNR_t of each sample's timestep (see ``snr``); the result has its
    shape. ``gamma`` is ``diffusion.min_snr_gamma`` (min_snr, soft_min_snr),
    ``p2_k`` / ``p2_gamma`` are ``diffusion.p2_k`` / ``diffusion.p2_gamma``.

    - none: 1 (PixArt's own L_simple).
    - min_snr: min(SNR, gamma) / SNR, see ``min_snr``.
    - soft_min_snr: gamma / (SNR + gamma), see ``soft_min_snr``.
    - debiased: 1 / sqrt(min(SNR, 1000)), see ``debiased``.
    - p2: 1 / (p2_k + SNR)^p2_gamma, see ``p2``.
    """
    if name not in LOSS_WEIGHTING:
        raise ValueError(f"diffusion.weighting {name!r} is not one of {', '.join(LOSS_WEIGHTING)}")
    if name == "none":
        return torch.ones_like(snr)
    if name == "min_snr":
        return min_snr(snr, gamma)
    if name == "soft_min_snr":
        return soft_min_snr(snr, gamma)
    if name == "debiased":
        return debiased(snr)
    return p2(snr, p2_k, p2_gamma)


def min_snr(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR: Min-SNR-gamma for epsilon prediction.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
    (arXiv:2303.09556): the x0 loss weighted by min(SNR, gamma) treats timesteps as
    tasks whose gradients conflict and stops the low-noise ones, whose SNR is huge,
    from dominating; divided by SNR for the epsilon loss (section 4.2 of the paper).
    It is 1 wherever SNR <= gamma (the noisy half of the schedule: PixArt's t >= 130
    for gamma 5) and gamma / SNR below that. As kohya-ss/sd-scripts
    library/custom_train_functions.py ``apply_snr_weight`` and diffusers'
    train_text_to_image.py compute it for epsilon.
    """
    _check_gamma(gamma)
    return torch.clamp(snr, max=gamma) / snr


def soft_min_snr(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / (SNR + gamma): Soft-Min-SNR for epsilon prediction.

    Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image Synthesis with
    Hourglass Diffusion Transformers" (arXiv:2401.11605) replace Min-SNR's hard
    min(SNR, gamma) on the x0 loss by the smooth 1 / (1/SNR + 1/gamma), which has no
    kink at SNR = gamma. Their code (crowsonkb/k-diffusion k_diffusion/layers.py,
    ``Denoiser._weighting_soft_min_snr``) states it in the Karras preconditioned
    parametrisation: weight (sigma sigma_d)^2 / (sigma^2 + sigma_d^2)^2 on the loss of
    the network output F, whose error is the x0 error divided by
    c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2). In x0 terms that is
    1 / (sigma^2 + sigma_d^2) = 1 / (1/SNR + 1/gamma) with SNR = 1/sigma^2 and
    gamma = 1/sigma_d^2 (sigma_d = 0.5 in HDiT, i.e. gamma = 4). Divided by SNR for
    the epsilon loss:

        w = (SNR gamma / (SNR + gamma)) / SNR = gamma / (SNR + gamma).

    Since min(a, b) / 2 <= 1 / (1/a + 1/b) <= min(a, b), this weight lies between
    half of ``min_snr``'s and ``min_snr``'s, tends to 1 at high noise and to
    gamma / SNR at low noise.

    Not SimpleTuner's: bghira/SimpleTuner ``compute_snr(use_soft_min=True)`` in
    helpers/training/min_snr_gamma.py (commit dedf96b2) substitutes the k-diffusion
    expression, evaluated at the DDPM sigma = sqrt(1 - abar_t) with sigma_d = 1, for
    SNR inside min(SNR, gamma) / SNR. That expression never exceeds 1/4, so for any
    gamma >= 1/4 the weight is 1 at every timestep; at its head (bc8e6ab7,
    simpletuner/helpers/models/common.py) the flag no longer reaches ``compute_snr``
    at all. The paper's definition, converted to epsilon prediction, is used here.
    """
    _check_gamma(gamma)
    return gamma / (snr + gamma)


def debiased(snr: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(min(SNR, 1000)): debiased estimation for epsilon prediction.

    Yu et al. 2024, "Unmasking Bias in Diffusion Model Training" (arXiv:2310.08442)
    argue the uniform epsilon loss over-trains the low-noise timesteps and weight it
    by 1 / sqrt(SNR_t). The cap at ``DEBIASED_SNR_CLAMP`` is not in the paper; it is
    kohya-ss/sd-scripts library/custom_train_functions.py ``apply_debiased_estimation``
    (commit 0329bea5, also followed by Nerogar/OneTrainer
    modules/modelSetup/mixin/ModelSetupDiffusionLossMixin.py), kept so LoRAs trained
    here weigh like the ones users compare them with; on PixArt's schedule it only
    changes t = 0 .. 5.
    """
    return torch.rsqrt(torch.clamp(snr, max=DEBIASED_SNR_CLAMP))


def p2(snr: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """1 / (k + SNR)^gamma: perception-prioritised weighting.

    Choi et al. 2022, "Perception Prioritized Training of Diffusion Models"
    (arXiv:2204.00227) multiply the epsilon loss by 1 / (k + SNR_t)^gamma to move
    weight from the low-noise timesteps, which only clean up imperceptible detail,
    to the content-forming middle ones; k keeps the weight finite and gamma sets the
    strength (k = 1, gamma 0.5 or 1 in the paper; gamma 0 is no weighting). As
    jychoi118/P2-weighting guided_diffusion/gaussian_diffusion.py computes it
    (commit 3da0947a, ``training_losses``) with SNR = 1/(1 - abar) - 1, which is the
    same SNR.
    """
    if not k > 0 or not gamma >= 0:
        raise ValueError(f"diffusion.p2_k must be positive and diffusion.p2_gamma >= 0, got {k} and {gamma}")
    return (k + snr).pow(-gamma)


def _check_gamma(gamma: float) -> None:
    if not gamma > 0:
        raise ValueError(f"diffusion.min_snr_gamma must be positive, got {gamma}")
