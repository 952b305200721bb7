"""The training recipe as typed, checked dataclasses (what ``recipes/*.yaml`` holds).

A recipe is YAML that loads into :class:`TrainConfig` through
:func:`pixart_tune.config.load_config`; ``key.sub=value`` overrides from the command
line merge in before the checks, and a misspelt key fails instead of training with
a default. The resolved config is written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable, Literal

from pixart_tune.adapters.lora import LoraSettings
from pixart_tune.base import REAL_MODEL_ID, RESOLUTIONS
from pixart_tune.config import load_config
from pixart_tune.errors import UserError

# Optimizer names this toolkit builds (see pixart_tune.training.optim).
OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "adamw", "adamw_fused", "lion8bit", "lion", "adafactor", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SEED_LIMIT = 2**32
"""Seeds run from 0 to 2**32 - 1: numpy, which the training seed also seeds, takes no others."""
MAX_VALIDATION_SIDE = 4096
"""Largest validation image side: the longest side of the 2048 px bucket table."""


def _at_least(section: str, minimum: int, **values: int) -> None:
    """Raises for the first of ``values`` below ``minimum``, naming it ``section.key``."""
    for key, value in values.items():
        if value < minimum:
            raise ValueError(f"{section}.{key} must be at least {minimum}, got {value}")


@dataclasses.dataclass
class ExtraDataset:
    """One more prepared dataset trained alongside ``data.path`` (class images, a second style set)."""

    path: Path
    """Folder written by ``pixart-tune prepare`` with the same model (VAE and T5) as
    ``data.path``; it may be prepared at another resolution."""
    repeats: int = 1
    """Times each of its images appears per epoch: balances a small set against a
    large one (10 subject images x 10 against 100 class images x 1)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")


@dataclasses.dataclass
class DataSection:
    path: Path | None = None
    """The main dataset: a folder written by ``pixart-tune prepare`` (dataset.json +
    latents/ + text/). Its resolution is the recipe's ``resolution``, validation
    renders at it, and its empty prompt is the one caption dropout uses."""
    repeats: int = 1
    """Times each image of ``path`` appears per epoch."""
    extra: list[ExtraDataset] = dataclasses.field(default_factory=list)
    """More prepared datasets, each ``{path: FOLDER, repeats: N}``; an epoch is every
    dataset's images, each listed its ``repeats`` times, in bucket batches."""
    batch_size: int = 1
    """Samples per device per micro-step; every batch comes from one aspect bucket."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the cached empty prompt (teaches the
    unconditional branch that classifier-free guidance needs)."""
    num_workers: int = 0
    """DataLoader worker processes reading the cache (0 reads in the training process)."""
    drop_last: bool = False
    """Drop a bucket's last, smaller batch (keeps the batch size constant)."""

    def __post_init__(self) -> None:
        _at_least("data", 1, batch_size=self.batch_size, repeats=self.repeats)
        _at_least("data", 0, num_workers=self.num_workers)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        self._check_distinct()

    def _check_distinct(self) -> None:
        """A dataset listed twice would silently double its weight: ``repeats`` says that."""
        if self.extra and self.path is None:
            raise ValueError("data.extra needs data.path: the main dataset (its resolution, empty prompt and validation size)")
        seen = {_same_folder(self.path): "data.path"} if self.path is not None else {}
        for index, extra in enumerate(self.extra):
            key, name = _same_folder(extra.path), f"data.extra[{index}]"
            if key in seen:
                raise ValueError(
                    f"{name} ({extra.path}) is the same dataset as {seen[key]}; list each dataset once "
                    "and raise its repeats to weight it more"
                )
            seen[key] = name

    def sources(self) -> list[tuple[Path, int]]:
        """(folder, repeats) of every dataset, the main one first."""
        if self.path is None:
            return []
        return [(self.path, self.repeats)] + [(extra.path, extra.repeats) for extra in self.extra]


def _same_folder(path: Path) -> Path:
    # resolve() follows symlinks and needs no folder to exist yet (a recipe is
    # checked before its datasets are prepared).
    return Path(path).expanduser().resolve()


@dataclasses.dataclass
class DiffusionSection:
    min_snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is the paper's value); null = plain MSE."""
    noise_offset: float = 0.0
    """Adds offset * N(0, 1) per sample and channel to the noise (darker darks,
    brighter brights); 0.05-0.1 is usual, 0 disables it."""

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma must be positive or null, got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"diffusion.noise_offset must be >= 0, got {self.noise_offset}")


@dataclasses.dataclass
class OptimSection:
    name: str = "adamw8bit"
    """One of adamw8bit (default: fits 24 GB), paged_adamw8bit, adamw, adamw_fused
    (PyTorch's fused AdamW kernel on every device, the CPU included), lion8bit, lion,
    adafactor, sgd."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 1e-2
    """Decoupled weight decay on the LoRA weights (AdamW / Lion style)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam / Lion (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm. PixArt's full fine-tunes clip at 0.01, which on a
    LoRA (few, freshly initialised weights whose gradient norm is far above that)
    turns every step into a fixed-length step and learns slowly; 1.0 is the usual
    LoRA value. null disables clipping."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be positive (1e-8 is usual), got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm must be positive or null, got {self.max_grad_norm}")


@dataclasses.dataclass
class ScheduleSection:
    steps: int = 1000
    """Optimizer steps to train (each of grad_accum micro-steps)."""
    epochs: int | None = None
    """Train this many passes over the data instead: ``steps`` becomes epochs x
    batches per epoch (per process, repeats included) / grad_accum, rounded up,
    and the run's saved config.yaml records the steps it came to."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr_scheduler: str = "constant_with_warmup"
    """diffusers.optimization scheduler name: constant, constant_with_warmup, linear,
    cosine, cosine_with_restarts, polynomial."""
    warmup_steps: int = 0
    """Optimizer steps of linear LR warm-up."""

    def __post_init__(self) -> None:
        _at_least("schedule", 1, steps=self.steps, grad_accum=self.grad_accum)
        if self.epochs is not None:
            _at_least("schedule", 1, epochs=self.epochs)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"schedule.lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"schedule.warmup_steps must be in [0, steps], got {self.warmup_steps}")


@dataclasses.dataclass
class CheckpointSection:
    every: int = 250
    """Save a resumable checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are removed once a newer one is complete."""

    def __post_init__(self) -> None:
        _at_least("checkpoint", 0, every=self.every)
        _at_least("checkpoint", 1, keep_last=self.keep_last)


@dataclasses.dataclass
class ValidationSection:
    every: int = 0
    """Render the validation grid every N optimizer steps (0 = never); also at the end."""
    prompts: list[str] = dataclasses.field(default_factory=list)
    """Fixed prompts, encoded once at start-up (then T5 is freed)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """One column per seed; the same seeds every time so grids compare across steps."""
    steps: int = 20
    """Sampling steps per image, with the model folder's sampling scheduler."""
    guidance: float = 4.5
    """Classifier-free guidance scale."""
    height: int | None = None
    """Image height in pixels; null = the dataset's resolution."""
    width: int | None = None
    """Image width in pixels; null = the dataset's resolution."""
    base: bool = True
    """Also render the same prompts and seeds once without the adapter, to
    samples/base.png, so each step's grid can be held against the base model."""

    def __post_init__(self) -> None:
        _at_least("validation", 0, every=self.every)
        if self.every and not self.prompts:
            raise ValueError("validation.every is set but validation.prompts is empty")
        _at_least("validation", 1, steps=self.steps)
        if self.guidance < 0:
            raise ValueError(f"validation.guidance must be >= 0 (4.5 is usual), got {self.guidance}")
        if not self.seeds:
            raise ValueError("validation.seeds needs at least one seed")
        for seed in self.seeds:
            if not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"validation.seeds must be in [0, 2**32), got {seed}")
        for side in (self.height, self.width):
            # 8 pixels per latent, 2x2 latents per PixArt-Sigma patch.
            if side is not None and (side < 64 or side % 16 or side > MAX_VALIDATION_SIDE):
                raise ValueError(f"validation.height and validation.width must be multiples of 16 from 64 to {MAX_VALIDATION_SIDE}, got {side}")


@dataclasses.dataclass
class LoggingSection:
    every: int = 10
    """Log loss, LR, grad norm, samples/s and peak memory every N optimizer steps.
    The loss is checked for NaN at these points (and before every save)."""
    tensorboard: bool = True
    """Write TensorBoard logs to OUTPUT_DIR/logs."""

    def __post_init__(self) -> None:
        _at_least("logging", 1, every=self.every)


@dataclasses.dataclass
class TrainConfig:
    model: str = REAL_MODEL_ID
    """Base model: hub id or a diffusers-layout folder (only transformer/ and
    scheduler/ are read for training; vae/ and text_encoder/ for validation)."""
    output_dir: Path = Path("runs/lora")
    """Where checkpoints/, samples/, logs/, config.yaml and the final adapter/ go."""
    seed: int = 0
    """Seeds the LoRA's initial weights, the data order, noise, timesteps and caption dropout."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the frozen base model; the LoRA weights are always fp32."""
    gradient_checkpointing: bool | int | Literal["auto"] = True
    """Recompute blocks' activations in backward instead of keeping them: true = every
    block (far less memory, ~30% slower), false = none, k = every k-th block (blocks
    0, k, 2k, ...: memory and time in between), auto = the least recomputation that
    ``pixart-tune plan`` predicts fits memory_budget_gb at this batch size."""
    lora_compute_dtype: Literal["fp32", "base"] = "fp32"
    """Where the LoRA branch multiplies: fp32 (PEFT's way: the layer input is cast to
    fp32) or base (in the base model's dtype; the LoRA weights, their gradients and the
    optimizer state stay fp32). base saves the fp32 copies of LoRA inputs and their
    casts on a bf16 base; plain LoRA only (not DoRA, LoKr, LoHa)."""
    compile: bool = False
    """torch.compile each transformer block (regional compilation: one graph for all
    blocks, seconds to compile). Needs a C compiler on the CPU, triton on a GPU."""
    init_adapter: Path | None = None
    """Start from this adapter folder (e.g. stage 1 of a two-stage schedule) instead
    of a fresh LoRA; its rank/alpha/targets must equal the lora section."""
    trigger_words: list[str] = dataclasses.field(default_factory=list)
    """Written into the adapter's metadata so users know how to call it."""
    resolution: int | None = None
    """Bucket table the dataset was prepared at (256, 512, 1024, 2048); training
    refuses a dataset prepared at another, and ``plan`` sizes activations by it.
    null = whatever the dataset has."""
    memory_budget_gb: float = 24.0
    """GPU memory this recipe is meant for; ``pixart-tune plan`` checks against it."""
    data: DataSection = dataclasses.field(default_factory=DataSection)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    diffusion: DiffusionSection = dataclasses.field(default_factory=DiffusionSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    validation: ValidationSection = dataclasses.field(default_factory=ValidationSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a hub id or a model folder")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        try:
            re.compile(self.lora.target_regex)
        except re.error as error:
            raise ValueError(
                f"lora.targets {self.lora.targets!r} is not a valid regular expression ({error}); "
                "use a preset (attention, attention_ff, all_linear) or a valid regex"
            ) from None
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {self.resolution}")
        if not isinstance(self.gradient_checkpointing, (bool, str)) and self.gradient_checkpointing < 1:
            raise ValueError(f"gradient_checkpointing must be true, false or a block interval k >= 1, got {self.gradient_checkpointing}")
        if self.lora_compute_dtype == "base" and (self.lora.type != "lora" or self.lora.dora):
            raise ValueError("lora_compute_dtype=base runs plain LoRA only (lora.type=lora, lora.dora=false); use lora_compute_dtype=fp32")
        if self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}")


def check_lora_targets(lora: LoraSettings, module_names: Iterable[str], model: str) -> None:
    """Refuses ``lora.targets`` that match no layer of the model (PEFT matches the whole name)."""
    regex = re.compile(lora.target_regex)
    if not any(regex.fullmatch(name) for name in module_names):
        raise UserError(
            f"lora.targets {lora.targets!r} matches no layer of {model}; use a preset (attention, attention_ff, "
            r"all_linear) or a regex over whole layer names, such as 'transformer_blocks\.\d+\.attn1\.to_q'"
        )


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe YAML + ``key=value`` overrides -> checked :class:`TrainConfig`."""
    return load_config(TrainConfig, path, overrides)
