"""Optimizers by name, and LR schedules with warm-up.

The 8-bit AdamW of bitsandbytes is the default: its two moments take 2 bytes per
LoRA weight instead of 8, the difference between fitting a 24 GB card or not for
large ranks. When bitsandbytes cannot run on this machine the trainer says so once
and uses PyTorch's AdamW: the same update rule as the 8-bit AdamWs; for the Lions
a different one, which the warning says.

Two optimizers come from extras (``pip install 'pixart-tune[prodigy]'`` or
``[schedulefree]``): Prodigy, which estimates its own step size (lr stays 1.0), and
schedule-free AdamW, which averages its iterates instead of decaying the LR. The
schedule-free one evaluates at a different point than it trains at: the trainer
switches it with :func:`set_optimizer_mode` around validation, evaluation and saving.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from typing import Iterable

import torch

from pixart_tune.errors import UserError
from pixart_tune.training.config import OptimSection

logger = logging.getLogger(__name__)

# Names served by bitsandbytes, and the PyTorch optimizer used when it cannot run.
_BNB = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit", "lion": "Lion"}
_FALLBACK = {"adamw8bit": "adamw", "paged_adamw8bit": "adamw", "lion8bit": "adamw", "lion": "adamw"}
# Names served by an optional package: (module, pixart-tune extra that installs it).
_EXTRAS = {"prodigy": ("prodigyopt", "prodigy"), "adamw_schedulefree": ("schedulefree", "schedulefree")}
# diffusers schedules that lower the LR after warm-up.
_DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")
# Prodigy's lr multiplies the step size it estimates; 1.0 is its intended value.
_PRODIGY_LR = (0.5, 2.0)
_warned: set[str] = set()

# Bytes of optimizer state per trainable parameter (the memory plan reads this).
STATE_BYTES_PER_PARAM = {
    "adamw8bit": 2.0,
    "paged_adamw8bit": 2.0,  # paged to host memory under pressure; counted as resident
    "adamw": 8.0,
    "adamw_fused": 8.0,
    "lion8bit": 1.0,
    "lion": 4.0,
    "adafactor": 0.1,  # factored second moment: rows + columns, not rows x columns
    "sgd": 4.0,
    # prodigyopt 1.1.2, Prodigy.step: exp_avg, exp_avg_sq, s (the gradient sum of
    # the D estimate, every slice_p-th entry; slice_p=1 here) and p0 (the starting
    # weights, every slice_p-th entry), all in the weight's dtype: 4 x fp32. For an
    # all-zero weight (LoRA's B at the start) p0 is one scalar, so 12 bytes: 16 is
    # the upper bound, which a plan should err towards.
    "prodigy": 16.0,
    # schedulefree 1.4.1, AdamWScheduleFree.step: z (the base sequence) and
    # exp_avg_sq, fp32 like the weights; no first moment (y interpolates instead).
    "adamw_schedulefree": 8.0,
}


def bitsandbytes_usable(device: torch.device) -> str | None:
    """None when bitsandbytes' 8-bit optimizer runs on ``device``, else the reason."""
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({error})"
    try:
        # A real step on a block-sized tensor: only running the kernel proves it works.
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        optimizer = bnb.optim.AdamW8bit([probe], lr=1e-3)
        probe.grad = torch.ones_like(probe)
        optimizer.step()
    except Exception as error:
        return f"bitsandbytes' 8-bit optimizer does not run on {device.type} here ({error})"
    return None


def resolve_name(name: str, device: torch.device) -> str:
    """``name``, or its PyTorch fallback when it needs bitsandbytes and that cannot run."""
    if name not in _BNB:
        return name
    reason = bitsandbytes_usable(device)
    if reason is None:
        return name
    fallback = _FALLBACK[name]
    if name not in _warned:
        _warned.add(name)
        if name.startswith("lion"):
            # Lion runs at a 3-10x lower learning rate than AdamW: the recipe's lr is likely too low now.
            note = "a different update rule: raise optim.lr 3-10x, or install a working bitsandbytes"
        else:
            note = "same update rule, 8 bytes of state per weight"
        logger.warning("%s; using %s instead of %s (%s)", reason, fallback, name, note)
    return fallback


def _import_extra(name: str):
    """The optional package behind optimizer ``name``, or a UserError naming its extra."""
    module, extra = _EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"optim.name={name} needs the {module} package: pip install 'pixart-tune[{extra}]'") from None


def _lr_advice(settings: OptimSection) -> list[str]:
    lo, hi = _PRODIGY_LR
    if settings.name == "prodigy" and not lo <= settings.lr <= hi:
        return [
            f"optim.lr={settings.lr:g} with prodigy: Prodigy estimates the step size itself and multiplies it by lr; "
            "keep optim.lr=1.0 and scale the estimate with optim.d_coef instead (0.5 gentler, 2 bolder)"
        ]
    return []


def _schedule_advice(schedule_free: bool, lr_scheduler: str) -> list[str]:
    if schedule_free and lr_scheduler in _DECAYING:
        return [
            f"schedule.lr_scheduler={lr_scheduler} with adamw_schedulefree: schedule-free AdamW averages its iterates "
            "in place of a decaying LR; use lr_scheduler=constant_with_warmup"
        ]
    return []


def optimizer_advice(optim: OptimSection, lr_scheduler: str) -> list[str]:
    """Lines of advice on a recipe's optimizer settings; empty when there is none.

    Prodigy with an lr far from 1.0 (it scales the step size Prodigy finds, so 1e-4
    all but stops training), and schedule-free AdamW under a decaying LR schedule.
    The trainer logs them once; ``plan`` prints them.
    """
    return _lr_advice(optim) + _schedule_advice(optim.name == "adamw_schedulefree", lr_scheduler)


def _warn_once(lines: list[str]) -> None:
    for line in lines:
        if line not in _warned:
            _warned.add(line)
            logger.warning("%s", line)


def _unwrap(optimizer):
    """The optimizer inside accelerate's AcceleratedOptimizer (it keeps it in ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_schedule_free(optimizer) -> bool:
    # Of the optimizers built here only the schedule-free one has train() and eval().
    inner = _unwrap(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def set_optimizer_mode(optimizer, training: bool) -> None:
    """Switches a schedule-free optimizer to its training point (``True``) or its evaluation point.

    Schedule-free AdamW trains at y, an interpolation between its average x and its
    base sequence z, and ``eval()`` moves the weights in place to x, the point its
    guarantees are about (schedulefree/adamw_schedulefree.py: ``p.lerp_(z, 1 - 1/beta1)``;
    ``train()`` lerps back with ``1 - beta1``). So: ``False`` before validating,
    evaluating or saving weights or a checkpoint, ``True`` before the next step.
    Saved in eval mode, a checkpoint holds x and an optimizer state that says so; the
    trainer calls this with ``True`` again after loading one, which restores y. A
    step outside train mode raises. Switching back agrees with the weights before
    to float rounding, not bit for bit (two lerps); a resumed run repeats the same
    lerps, so it still continues bit for bit.

    ``optimizer`` is the optimizer or accelerate's wrapper around it; for every other
    optimizer this does nothing. Repeated calls with the same mode do nothing.
    """
    if not _is_schedule_free(optimizer):
        return
    inner = _unwrap(optimizer)
    if training:
        inner.train()
    else:
        inner.eval()


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``settings.name`` over ``params``.

    A schedule-free optimizer comes back in train mode, ready to step.
    """
    params = list(params)
    name = resolve_name(settings.name, device)
    common = dict(lr=settings.lr, weight_decay=settings.weight_decay)
    if name in _BNB:
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, _BNB[name])
        if name.startswith("lion"):
            return cls(params, betas=settings.betas, **common)
        return cls(params, betas=settings.betas, eps=settings.eps, **common)
    if name == "adamw":
        # The fused CUDA kernel does the whole update in one launch.
        return torch.optim.AdamW(params, betas=settings.betas, eps=settings.eps, fused=device.type == "cuda", **common)
    if name == "adamw_fused":
        # One kernel for the whole update on CUDA and the CPU alike; fp32 state, like adamw.
        return torch.optim.AdamW(params, betas=settings.betas, eps=settings.eps, fused=True, **common)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, relative_step=False, scale_parameter=False, warmup_init=False, **common)
    if name == "sgd":
        return torch.optim.SGD(params, momentum=settings.betas[0], **common)
    if name == "prodigy":
        prodigyopt = _import_extra(name)
        _warn_once(_lr_advice(settings))
        # The Prodigy README's settings for diffusion models (with weight decay 0.01):
        # - use_bias_correction: Adam's bias correction. Without it the moments, which
        #   start at zero, make the first steps (1 - beta1) / sqrt(1 - beta2) times
        #   Adam's: about 3x at beta2 0.999.
        # - safeguard_warmup: the D estimate's denominator (prodigy.py, state['s'])
        #   sums gradients weighted by d instead of d * lr * bias_correction. An LR
        #   warm-up and the bias correction (0.32 at the first step, 1 later) both
        #   make that factor small early on, which makes Prodigy overestimate D
        #   (the README's warning about warm-up); the safeguard takes it out.
        # decouple=True: AdamW-style decay, scaled by the estimated step (d * lr).
        # Prodigy's __init__ prints "Using decoupled weight decay" when weight_decay > 0;
        # a library does not print.
        with contextlib.redirect_stdout(io.StringIO()):
            return prodigyopt.Prodigy(
                params, betas=settings.betas, eps=settings.eps, d_coef=settings.d_coef, decouple=True,
                use_bias_correction=True, safeguard_warmup=True, **common,
            )
    if name == "adamw_schedulefree":
        schedulefree = _import_extra(name)
        # warmup_steps=0: schedule.warmup_steps reaches it through the LR schedule
        # instead. AdamWScheduleFree.step reads group["lr"] every step and uses
        # group["lr"] * its own warm-up factor both for the step and for the average's
        # weights (lr_max ** weight_lr_power), so constant_with_warmup, which sets
        # group["lr"] = lr * k / warmup_steps, is the same warm-up (one step later: the
        # diffusers ramp starts at 0). One warm-up setting for every optimizer, never two
        # applied at once, and the LR the trainer logs is the one used. weight_decay is
        # AdamW-style: added to the normalised gradient at y, times lr.
        optimizer = schedulefree.AdamWScheduleFree(
            params, betas=settings.betas, eps=settings.eps, warmup_steps=0, **common,
        )
        # It starts in eval mode (train_mode=False) and refuses to step there.
        optimizer.train()
        return optimizer
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """A diffusers LR schedule stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    _warn_once(_schedule_advice(_is_schedule_free(optimizer), name))

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
