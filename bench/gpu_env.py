"""Shared pieces of the GPU check: its settings, results, goals, log and device helpers."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import sys
import time
from typing import Any

import torch


GIB = 2**30
H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's H100/H200 SXM dense (no sparsity) BF16 tensor-core peak, TFLOP/s."""
TOKENS = 300
RANK = 16
LOW_MEMORY_GOAL_GIB = 8.0
SPEED_GOAL = 12.0
PLAN_GOAL = 0.15
FIT_BUDGET_GIB = 24.0
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
PROMPT_WORDS = (
    "a detailed photo of an old lighthouse on a rocky cliff at sunset with warm light on the waves "
    "and seagulls in a deep blue sky painted in the style of a watercolor illustration"
).split()


_START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setting:
    """What one run of the script measures."""

    tiny: bool
    device: torch.device
    resolutions: list[int]
    batches: list[int]
    checkpointing: list[bool]
    steps: int
    warmup: int
    peak_tflops: float | None
    t5_prompts: int
    t5_batch: int
    deadline: float
    """time.monotonic() after which no new configuration starts."""
    dtype: torch.dtype = torch.bfloat16
    """Base-model dtype: bf16, except in tiny mode on a CPU (fp32: bf16 kernels there are
    compiled per shape, which would make the smoke run ten times slower)."""

    def transformer_config(self, resolution: int) -> dict[str, Any]:
        """The real XL-2 at ``resolution`` (its checkpoint's sample size and pos-embed scale), or a tiny one."""
        from pixart_tune.base import INTERPOLATION_SCALE
        from pixart_tune.models import XL2_TRANSFORMER_CONFIG
        from pixart_tune.tiny import tiny_transformer_config

        base = tiny_transformer_config(layers=2, heads=2, head_dim=16, caption_channels=32) if self.tiny else dict(XL2_TRANSFORMER_CONFIG)
        return dict(base, sample_size=resolution // 8, interpolation_scale=INTERPOLATION_SCALE[resolution])

    def t5_config(self) -> dict[str, Any]:
        from pixart_tune.models import T5_XXL_CONFIG

        if self.tiny:
            return dict(T5_XXL_CONFIG, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
        return dict(T5_XXL_CONFIG)


@dataclasses.dataclass
class TrainResult:
    resolution: int
    batch: int
    checkpointing: bool
    optimizer: str = ""
    status: str = "ok"
    """ok, OOM, skipped (...) or error (...)."""
    peak_allocated: float | None = None
    peak_reserved: float | None = None
    process_peak: float | None = None
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    samples_per_s: float | None = None
    model_tflop_per_step: float | None = None
    plan_total: float | None = None
    plan_allocated: float | None = None
    """The plan less its CUDA context and fragmentation rows: comparable to peak allocated."""

    @property
    def step_time(self) -> float | None:
        if not self.step_seconds:
            return None
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2]


# --- environment ---------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as error:  # a missing or broken package: the report says which
            versions[name] = f"missing ({type(error).__name__})"
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}"
    from bench.common import machine

    return f"CPU: {machine()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(error, oom)) or "out of memory" in str(error).lower()
