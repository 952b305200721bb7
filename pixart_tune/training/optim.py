"""Optimizers by name, and LR schedules with warm-up.

The 8-bit AdamW of bitsandbytes is the default: its two moments take 2 bytes per
LoRA weight instead of 8, the difference between fitting a 24 GB card or not for
large ranks. When bitsandbytes cannot run on this machine the trainer says so once
and uses PyTorch's AdamW: the same update rule as the 8-bit AdamWs; for the Lions
a different one, which the warning says.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from pixart_tune.training.config import OptimSection

logger = logging.getLogger(__name__)

# Names served by bitsandbytes, and the PyTorch optimizer used when it cannot run.
_BNB = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit", "lion": "Lion"}
_FALLBACK = {"adamw8bit": "adamw", "paged_adamw8bit": "adamw", "lion8bit": "adamw", "lion": "adamw"}
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


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``settings.name`` over ``params``."""
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
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """A diffusers LR schedule stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
