"""Shared pieces of the GPU check: settings, results, goals, the environment check, log and device helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import sys
import time
import traceback
from typing import Any

import torch


GIB = 2**30
H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's H100/H200 SXM dense (no sparsity) BF16 tensor-core peak, TFLOP/s."""
TOKENS = 300
RANK = 16
LOW_MEMORY_GOAL_GIB = 5.0
SPEED_GOAL = 20.0
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
    variants: tuple = ()
    """Variant rows run beside the base grid at the first resolution (see VARIANTS)."""
    row_budget: float = 0.0
    """Seconds a row may take: none starts later than this before the deadline."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor on a GPU; aot_eager in tiny mode (no C++ build, the same graph capture)."""
    t5_cap: float = 120.0
    """Seconds the T5 subprocess may run, load included."""

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


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a training row changes beyond resolution, batch and checkpointing."""

    name: str = "base"
    compile: bool = False
    """``torch.compile`` of each transformer block (regional compilation)."""
    lora_compute: str = "fp32"
    """fp32: PEFT's LoRA branch in fp32 on the bf16 base; bf16: under autocast (fp32 master weights kept)."""
    optimizer: str = "adamw8bit"
    """Asked for; the row records what ran (adamw when bitsandbytes cannot run)."""
    cap: bool = False
    """Cap the allocator at the fit budget whatever the plan says: the row tests a claim that it fits."""


VARIANTS = (
    Variant("bf16 LoRA", lora_compute="bf16", cap=True),
    Variant("fused AdamW", optimizer="adamw_fused"),
    Variant("bf16 LoRA + compile", compile=True, lora_compute="bf16"),
)
"""Beside the base rows, at the goal's size: what each change of issue 12 buys, measured."""


@dataclasses.dataclass
class TrainResult:
    resolution: int
    batch: int
    checkpointing: bool
    variant: Variant = Variant()
    optimizer: str = ""
    status: str = "ok"
    """ok, OOM, skipped (...) or error (...)."""
    cap_gib: float | None = None
    """Allocator cap for this row (set_per_process_memory_fraction): a fits-or-OOM test of the plan's claim."""
    sdpa: str = ""
    """Scaled-dot-product-attention backends the steps chose, with call counts per step."""
    tf32: bool = False
    host_seconds: list[float] = dataclasses.field(default_factory=list)
    """Per step, the host's time to issue the step (no sync): near the GPU time means launch-bound."""
    recompute_tflop_per_step: float = 0.0
    """Forward FLOPs run again by gradient checkpointing (counted in hardware utilisation)."""
    compile_seconds: float | None = None
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
        return median(self.step_seconds)

    @property
    def host_time(self) -> float | None:
        return median(self.host_seconds)


def median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


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


def record_plan(result: Any, plan: Any) -> None:
    """The plan's predicted peak, and what torch's allocator itself holds: the plan less its CUDA context and fragmentation."""
    from pixart_tune.training.memory import CONTEXT_RESERVE_GIB

    fragmentation = sum(size for name, size in plan.rows if name.startswith("allocator fragmentation"))
    result.plan_total = plan.total_bytes / GIB
    result.plan_allocated = (plan.total_bytes - CONTEXT_RESERVE_GIB * GIB - fragmentation) / GIB


def record_failure(result: Any, error: BaseException, device: torch.device) -> None:
    """A failed row's status (OOM, or the error's first line with its traceback logged) and its peak so far."""
    if is_oom(error):
        result.status = "OOM"
    else:
        log(traceback.format_exc())
        first = str(error).splitlines()[0][:120] if str(error) else ""
        result.status = f"error ({type(error).__name__}: {first})"
    if device.type == "cuda":
        result.peak_allocated = torch.cuda.max_memory_allocated(device) / GIB


# --- what must be there before any GPU time is spent ----------------------------------

REQUIRED = ("numpy", "psutil", "yaml", "PIL", "regex", "requests", "huggingface_hub", "safetensors", "tokenizers",
            "sentencepiece", "transformers", "diffusers", "peft", "accelerate", "pixart_tune.training.memory",
            "pixart_tune.encoders", "pixart_tune.training.trainer", "bench.common")
"""Every module the check imports (each pulls in its own dependencies)."""
MIN_FREE_GIB = 30.0
"""Free device memory the full check needs (2048 px batch 4 without a cap)."""


def environment_problems(device: torch.device, tiny: bool) -> list[str]:
    """What is missing or unusable for the check, one short phrase each; empty when all is there."""
    problems = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a broken native library
            problems.append(f"{name} ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return [*problems, "CUDA (torch sees no GPU)"]
        try:
            importlib.import_module("bitsandbytes")
            from pixart_tune.training.optim import bitsandbytes_usable

            reason = bitsandbytes_usable(device)
            if reason:
                problems.append(f"bitsandbytes on CUDA {torch.version.cuda} ({reason})")
        except Exception as error:
            problems.append(f"bitsandbytes ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})")
        free, _ = torch.cuda.mem_get_info(device)
        if not tiny and free / GIB < MIN_FREE_GIB:
            problems.append(f"free GPU memory ({free / GIB:.1f} GiB free, {MIN_FREE_GIB:g} needed: another process holds the GPU)")
    return problems


# --- which attention kernels run ------------------------------------------------------

SDPA_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


@contextlib.contextmanager
def record_sdpa(counts: dict[str, int]):
    """Counts the backend PyTorch's dispatcher picks for each scaled_dot_product_attention call."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        try:
            choice = torch._fused_sdp_choice(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
            name = SDPA_NAMES.get(int(choice), str(int(choice)))
        except Exception:  # private API: a torch without it says so instead of failing the row
            name = "unknown"
        label = f"{name}{' +mask' if attn_mask is not None else ''}"
        counts[label] = counts.get(label, 0) + 1
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = original


# --- report ---------------------------------------------------------------------------


def describe(result: TrainResult) -> str:
    mode = "ckpt on" if result.checkpointing else "ckpt off"
    head = f"{result.resolution} px batch {result.batch} {mode}" + ("" if result.variant.name == "base" else f" [{result.variant.name}]")
    if result.status != "ok":
        return f"{head}: {result.status}"
    memory = f", peak allocated {result.peak_allocated:.2f} GiB" if result.peak_allocated is not None else ""
    plan = f", plan {result.plan_total:.2f} GiB" if result.plan_total is not None else ""
    return f"{head}: {result.samples_per_s:.2f} samples/s{memory}{plan}"


def pct(plan: float | None, measured: float | None) -> str:
    if plan is None or not measured:
        return "n/a"
    return f"{(plan - measured) / measured * 100:+.0f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def utilisation(result: TrainResult, peak: float | None, recompute: bool) -> float | None:
    """Model FLOP utilisation (recompute=False) or hardware FLOP utilisation (recomputed forward counted)."""
    if result.status != "ok" or not peak or not result.step_time or result.model_tflop_per_step is None:
        return None
    flop = result.model_tflop_per_step + (result.recompute_tflop_per_step if recompute else 0.0)
    return flop / result.step_time / peak


TRAIN_HEADERS = [
    "px", "batch", "grad ckpt", "optimizer", "status", "samples/s", "step s (median)", "TFLOP/step", "MFU",
    "peak alloc GiB", "plan alloc GiB", "plan vs alloc", "peak reserved GiB", "process GiB", "plan GiB", "plan vs process",
    "HFU", "cap GiB", "compile", "LoRA compute", "TF32", "host ms/step", "GPU ms/step", "SDPA calls per step",
]


def train_row(r: TrainResult, peak: float | None) -> list[Any]:
    share = lambda value: "n/a" if value is None else f"{value * 100:.1f}%"
    ms = lambda value: "n/a" if value is None else f"{value * 1000:.1f}"
    compile_note = "off" if not r.variant.compile else f"on ({num(r.compile_seconds, 0)} s)"
    return [
        r.resolution, r.batch, "on" if r.checkpointing else "off", r.optimizer, r.status,
        num(r.samples_per_s), num(r.step_time, 3), f"{r.model_tflop_per_step:.3g}" if r.model_tflop_per_step is not None else "n/a",
        share(utilisation(r, peak, False)),
        num(r.peak_allocated), num(r.plan_allocated), pct(r.plan_allocated, r.peak_allocated),
        num(r.peak_reserved), num(r.process_peak), num(r.plan_total), pct(r.plan_total, r.process_peak),
        share(utilisation(r, peak, True)), num(r.cap_gib), compile_note, r.variant.lora_compute, "on" if r.tf32 else "off",
        ms(r.host_time), ms(r.step_time), r.sdpa or "n/a",
    ]


def report(setting: Setting, train: list[TrainResult], train_note: str, t5: Any, t5_note: str, seconds: float) -> str:
    from bench.common import git_commit, table

    versions = library_versions()
    peak = setting.peak_tflops
    lines = [
        f"# GPU check{' (tiny CPU mode: code-path check, numbers mean nothing)' if setting.tiny else ''}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}; run time {seconds:.0f} s",
        f"- device: {device_name(setting.device)}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- model: {'tiny PixArt config' if setting.tiny else 'PixArt-Sigma XL-2 (610.9 M parameters), random init'}, {DTYPE_NAMES[setting.dtype]} base, "
        f"LoRA rank {RANK} on attention, min-SNR 5 loss, grad clipping 1.0, {TOKENS}-token captions; "
        f"{setting.warmup} warm-up + {setting.steps} timed steps per configuration",
        "- MFU = model FLOPs of forward + backward (FlopCounterMode on the meta device, no recomputation) / GPU step time / "
        + (f"{peak:g} TFLOP/s ({'H100/H200 SXM dense BF16 peak' if peak == H200_BF16_DENSE_TFLOPS else 'given peak'})" if peak else "peak (unknown for this device: n/a)")
        + "; HFU counts the forward that gradient checkpointing runs again",
        "- peak alloc / reserved: torch.cuda.max_memory_allocated / _reserved over warm-up + timed steps; process = (CUDA context "
        "and kernel modules: device used - reserved, after the steps) + peak reserved, what nvidia-smi would show; plan = `pixart-tune plan` (plan alloc = plan less its CUDA-context and fragmentation rows)",
        f"- cap: rows the plan puts within {FIT_BUDGET_GIB:g} GB, and rows that claim to fit, run with the allocator capped "
        f"(torch.cuda.set_per_process_memory_fraction) at {FIT_BUDGET_GIB:g} GiB less the memory outside it: OOM there means the claim is wrong",
        "- host ms/step: the host's time to issue a step without waiting; GPU ms/step: CUDA events around it. Host near GPU = launch-bound",
        "",
    ]
    base = [r for r in train if r.variant.name == "base"]
    variants = [r for r in train if r.variant.name != "base"]
    if base:
        lines += ["## Training", "", table(TRAIN_HEADERS, [train_row(r, peak) for r in base]), ""]
    if variants:
        lines += ["## Training variants", "", table(["variant", *TRAIN_HEADERS], [[r.variant.name, *train_row(r, peak)] for r in variants]), ""]
    if train_note:
        lines += [train_note, ""]
    if t5 is not None:
        lines += ["## T5-XXL caching (prepare's TextEncoder, last, in a time-capped subprocess)", "", table(
            ["encoder", "parameters", "precision", "status", "batch", "prompts", "load s", "prompts/s", "peak alloc GiB"],
            [["T5 v1.1 XXL (random)" if not setting.tiny else "tiny T5", f"{t5.parameters / 1e9:.2f} B" if not setting.tiny else f"{t5.parameters:,}",
              t5.precision, t5.status, t5.batch, t5.prompts, num(t5.load_seconds, 1), num(t5.prompts_per_s, 1), num(t5.peak_allocated)]],
        ), ""]
    if t5_note:
        lines += [t5_note, ""]
    lines += [f"**{summary(setting, train)}**", ""]
    return "\n".join(lines)


def raw_numbers(setting: Setting, train: list[TrainResult], t5: Any, seconds: float) -> dict[str, Any]:
    """Everything measured, unrounded, for the JSON beside the table."""
    from bench.common import git_commit

    rows = []
    for r in train:
        row = dataclasses.asdict(r)
        row.update(step_time=r.step_time, host_time=r.host_time, mfu=utilisation(r, setting.peak_tflops, False),
                   hfu=utilisation(r, setting.peak_tflops, True))
        rows.append(row)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(), "seconds": seconds, "tiny": setting.tiny,
        "device": device_name(setting.device), "libraries": library_versions(), "peak_tflops": setting.peak_tflops,
        "dtype": DTYPE_NAMES[setting.dtype], "warmup": setting.warmup, "steps": setting.steps,
        "train": rows, "t5": dataclasses.asdict(t5) if t5 is not None else None, "summary": summary(setting, train),
    }


def summary(setting: Setting, train: list[TrainResult]) -> str:
    """The one-line figure against the goals (1024 px, batch 4)."""
    if setting.tiny:
        ok = sum(r.status == "ok" for r in train)
        return f"gpu_check --tiny: {ok} of {len(train)} training configurations ran (a code-path check on tiny models; its numbers mean nothing)"
    resolution = max(setting.resolutions, key=lambda r: (r == 1024, -abs(r - 1024)))
    batch = max(setting.batches)
    ok = [r for r in train if r.status == "ok" and r.resolution == resolution and r.batch == batch]
    parts = [f"gpu_check at {resolution} px batch {batch}:"]
    # Fits: ran under the cap, or its whole-process peak is within the budget.
    fits = [r for r in ok if r.cap_gib is not None or (r.process_peak is not None and r.process_peak <= FIT_BUDGET_GIB)]
    if fits:
        best = max(fits, key=lambda r: r.samples_per_s or 0)
        parts.append(f"{best.samples_per_s:.2f} samples/s ({best.variant.name}, ckpt {'on' if best.checkpointing else 'off'}; "
                     f"goal >= {SPEED_GOAL:g} within {FIT_BUDGET_GIB:g} GB)")
    low = [r for r in ok if r.checkpointing and r.peak_allocated is not None]
    if low:
        parts.append(f"low-memory peak {min(r.peak_allocated for r in low):.2f} GiB allocated (goal <= {LOW_MEMORY_GOAL_GIB:g})")
    diffs = [abs(r.plan_total - r.process_peak) / r.process_peak for r in train
             if r.status == "ok" and r.process_peak and r.plan_total is not None and r.variant.name == "base"]
    if diffs:
        parts.append(f"plan within {max(diffs) * 100:.0f}% of every measured process peak (goal {PLAN_GOAL * 100:.0f}%)")
    if len(parts) == 1:
        parts.append("no measured configuration")
    return " ".join(parts)
