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
OPTIMIZERS = (
    "adamw8bit", "paged_adamw8bit", "adamw", "adamw_fused", "lion8bit", "lion", "adafactor", "sgd", "prodigy", "adamw_schedulefree",
)
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "range")
LOSS_WEIGHTING = ("none", "min_snr", "soft_min_snr", "debiased", "p2")
TRACKERS = ("tensorboard", "wandb")
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
    large one (10 subject images x 10 against 100 class images x 1). Not used with
    kind: class, whose share is ``ratio``."""
    kind: Literal["instance", "class"] = "instance"
    """instance: more training images. class: prior-preservation images of the
    subject's class (made by the base model), drawn at ``ratio`` and weighted by
    ``loss_weight``, so the class keeps its look while the subject is learned."""
    loss_weight: float = 1.0
    """Weight of this dataset's samples in the loss (kohya's prior_loss_weight for a
    class dataset; 1.0 is usual)."""
    ratio: float = 1.0
    """kind: class only: class samples per instance sample in an epoch (1.0 = as many
    as the other datasets together, kohya's balance). Batches mix the two evenly
    within each aspect bucket; the class images are cycled through across epochs."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if not 0.0 <= self.loss_weight <= 100.0:
            raise ValueError(f"loss_weight must be in [0, 100], got {self.loss_weight}")
        if not 0.0 < self.ratio <= 10.0:
            raise ValueError(f"ratio must be in (0, 10], got {self.ratio}")


@dataclasses.dataclass
class DataSection:
    path: Path | None = None
    """The main dataset: a folder written by ``pixart-tune prepare`` (dataset.json +
    latents/ + text/). Its resolution is the recipe's ``resolution``, validation
    renders at it, and its empty prompt is the one caption dropout uses."""
    repeats: int = 1
    """Times each image of ``path`` appears per epoch."""
    extra: list[ExtraDataset] = dataclasses.field(default_factory=list)
    """More prepared datasets, each ``{path: FOLDER, repeats: N}`` (plus ``kind``,
    ``loss_weight``, ``ratio``); an epoch is every dataset's images, each listed its
    ``repeats`` times, in bucket batches, and a ``kind: class`` dataset's images drawn
    at its ``ratio``."""
    batch_size: int = 1
    """Samples per device per micro-step; every batch comes from one aspect bucket."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the cached empty prompt (teaches the
    unconditional branch that classifier-free guidance needs)."""
    num_workers: int = 0
    """DataLoader worker processes reading the cache (0 reads in the training process)."""
    drop_last: bool = False
    """Drop a bucket's last, smaller batch (keeps the batch size constant)."""
    loss_weight: float = 1.0
    """Weight of the main dataset's samples in the loss."""
    mask_floor: float = 0.1
    """Masked loss (images prepared with masks): the loss weight of pixels outside the
    mask, 0 to 1. 0 trains only inside the mask; a little weight outside (OneTrainer
    uses 0.1) keeps the model from forgetting backgrounds. Images without a mask
    weigh every pixel 1."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the main dataset's images (chosen by content, so the
    same images whatever the order) for the evaluation loss; they are not trained on."""
    eval: Path | None = None
    """A prepared dataset to measure the evaluation loss on instead (same model as
    data.path); exclusive with eval_fraction."""

    def __post_init__(self) -> None:
        _at_least("data", 1, batch_size=self.batch_size, repeats=self.repeats)
        _at_least("data", 0, num_workers=self.num_workers)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.loss_weight <= 100.0:
            raise ValueError(f"data.loss_weight must be in [0, 100], got {self.loss_weight}")
        if not 0.0 <= self.mask_floor <= 1.0:
            raise ValueError(f"data.mask_floor must be in [0, 1], got {self.mask_floor}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval is not None:
            raise ValueError("data.eval_fraction and data.eval both name an evaluation set; set one of them")
        if sum(extra.kind == "class" for extra in self.extra) > 1:
            raise ValueError("data.extra lists more than one dataset of kind: class; prepare the class images as one dataset")
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

    def datasets(self) -> list[ExtraDataset]:
        """Every dataset with its kind, weight and ratio, the main one first."""
        if self.path is None:
            return []
        return [ExtraDataset(self.path, self.repeats, loss_weight=self.loss_weight), *self.extra]


def _same_folder(path: Path) -> Path:
    # resolve() follows symlinks and needs no folder to exist yet (a recipe is
    # checked before its datasets are prepared).
    return Path(path).expanduser().resolve()


@dataclasses.dataclass
class TimestepSection:
    sampling: str = "uniform"
    """How training timesteps are drawn: uniform (PixArt's own training), logit_normal
    (t/T = sigmoid(N(mean, std)): more of the middle timesteps, as SD3 trains) or
    range (only, or more often, the timesteps in ``range``)."""
    mean: float = 0.0
    """logit_normal: mean of the normal before the sigmoid (negative favours low noise)."""
    std: float = 1.0
    """logit_normal: standard deviation of the normal before the sigmoid."""
    range: tuple[int, int] | None = None
    """range: [min, max] timesteps, both included, in 0 .. num_train_timesteps - 1
    (for example [0, 399] for a detail-stage model, [400, 999] for a composition one)."""
    range_bias: float | None = None
    """range: null draws only from ``range``; a number b makes each timestep in it b
    times as likely as one outside (b > 1 favours the range, b < 1 avoids it)."""

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"diffusion.timesteps.sampling {self.sampling!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")
        if self.std <= 0:
            raise ValueError(f"diffusion.timesteps.std must be positive, got {self.std}")
        if self.sampling == "range" and self.range is None:
            raise ValueError("diffusion.timesteps.sampling=range needs diffusion.timesteps.range: [min, max]")
        if self.sampling != "range" and (self.range is not None or self.range_bias is not None):
            raise ValueError(f"diffusion.timesteps.range and range_bias apply to sampling=range only (sampling is {self.sampling}); set sampling=range or drop them")
        if self.range is not None and not 0 <= self.range[0] <= self.range[1]:
            raise ValueError(f"diffusion.timesteps.range must be [min, max] with 0 <= min <= max, got {list(self.range)}")
        if self.range_bias is not None and self.range_bias <= 0:
            raise ValueError(f"diffusion.timesteps.range_bias must be positive or null, got {self.range_bias}")


@dataclasses.dataclass
class DiffusionSection:
    weighting: str | None = None
    """Per-timestep loss weight: none, min_snr (Hang et al. 2023), soft_min_snr
    (Crowson et al. 2024), debiased (Yu et al. 2024) or p2 (Choi et al. 2022); see
    docs/training.md. null = min_snr when min_snr_gamma is set, else none."""
    min_snr_gamma: float | None = None
    """Gamma of min_snr and soft_min_snr (5.0 is the paper's value); setting it alone
    turns min_snr on."""
    p2_k: float = 1.0
    """p2: the k of 1 / (k + SNR)^gamma (1 in the paper)."""
    p2_gamma: float = 1.0
    """p2: the gamma of 1 / (k + SNR)^gamma (0.5 or 1 in the paper; 0 = no weighting)."""
    noise_offset: float = 0.0
    """Adds offset * N(0, 1) per sample and channel to the noise (darker darks,
    brighter brights); 0.05-0.1 is usual, 0 disables it."""
    timesteps: TimestepSection = dataclasses.field(default_factory=TimestepSection)

    def __post_init__(self) -> None:
        if self.weighting is not None and self.weighting not in LOSS_WEIGHTING:
            raise ValueError(f"diffusion.weighting {self.weighting!r} is not one of {', '.join(LOSS_WEIGHTING)}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma must be positive or null, got {self.min_snr_gamma}")
        if self.p2_k <= 0 or self.p2_gamma < 0:
            raise ValueError(f"diffusion.p2_k must be positive and diffusion.p2_gamma >= 0, got {self.p2_k} and {self.p2_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"diffusion.noise_offset must be >= 0, got {self.noise_offset}")

    @property
    def loss_weighting(self) -> str:
        """The weighting in force (``weighting``, or what ``min_snr_gamma`` alone implies)."""
        if self.weighting is not None:
            return self.weighting
        return "min_snr" if self.min_snr_gamma is not None else "none"

    @property
    def gamma(self) -> float:
        """The SNR gamma of min_snr / soft_min_snr (5.0 when not set)."""
        return self.min_snr_gamma if self.min_snr_gamma is not None else 5.0


@dataclasses.dataclass
class OptimSection:
    name: str = "adamw8bit"
    """One of adamw8bit (default: fits 24 GB), paged_adamw8bit, adamw, adamw_fused
    (PyTorch's fused AdamW kernel on every device, the CPU included), lion8bit, lion,
    adafactor, sgd, prodigy (finds its own step size: set lr 1.0; the ``prodigy``
    extra) and adamw_schedulefree (no LR decay needed: keep lr_scheduler constant;
    the ``schedulefree`` extra)."""
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
    d_coef: float = 1.0
    """prodigy only: scales the step size Prodigy estimates (below 1 for a gentler LoRA)."""

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
        if self.d_coef <= 0:
            raise ValueError(f"optim.d_coef must be positive, got {self.d_coef}")


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
    clip_model: str | None = None
    """A CLIP model (folder or hub id, e.g. openai/clip-vit-large-patch14) to score
    each validation image against its prompt (CLIP score, 0-100), logged per
    validation; null = no score."""

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
class EmaSection:
    enabled: bool = False
    """Keep an exponential moving average of the LoRA weights (an fp32 shadow copy),
    validate with it and save it as the adapter (the raw weights go to adapter_raw/)."""
    decay: float = 0.999
    """shadow = decay * shadow + (1 - decay) * weights at each update; the average
    spans about 1 / (1 - decay) updates."""
    start_step: int = 0
    """Updates begin after this optimizer step; until then the shadow copies the weights."""
    every: int = 1
    """Update every N optimizer steps (the decay applies per update)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")
        _at_least("ema", 0, start_step=self.start_step)
        _at_least("ema", 1, every=self.every)


@dataclasses.dataclass
class EvaluationSection:
    every: int = 100
    """Measure the evaluation loss every N optimizer steps (and at the end) when the
    recipe holds images out (data.eval_fraction or data.eval); 0 = only at the end."""
    timesteps: list[int] = dataclasses.field(default_factory=lambda: [100, 300, 500, 700, 900])
    """The fixed timesteps each held-out image is noised at; with fixed noise they make
    the loss comparable across steps and runs."""
    seed: int = 0
    """Seeds the fixed evaluation noise (independent of the training seed)."""

    def __post_init__(self) -> None:
        _at_least("evaluation", 0, every=self.every)
        if not self.timesteps or min(self.timesteps) < 0:
            raise ValueError(f"evaluation.timesteps needs at least one timestep >= 0, got {self.timesteps}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"evaluation.seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass
class LoggingSection:
    every: int = 10
    """Log loss, LR, grad norm, samples/s and peak memory every N optimizer steps.
    The loss is checked for NaN at these points (and before every save)."""
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """Trackers, through accelerate: tensorboard (OUTPUT_DIR/logs) and wandb (the
    ``wandb`` extra; WANDB_MODE=offline logs without an account). [] logs to none;
    loss.json and loss.png are written either way."""
    project: str = "pixart-tune"
    """The tracker project (wandb's project; runs are named after output_dir)."""
    tensorboard: bool | None = None
    """Older recipes' switch, still read: true adds tensorboard to report_to, false
    removes it; null leaves report_to as it is."""

    def __post_init__(self) -> None:
        _at_least("logging", 1, every=self.every)
        if self.tensorboard is not None:
            kept = [name for name in self.report_to if name != "tensorboard"]
            self.report_to = ["tensorboard", *kept] if self.tensorboard else kept
            self.tensorboard = None  # said once: the saved config.yaml carries report_to alone
        for name in self.report_to:
            if name not in TRACKERS:
                raise ValueError(f"logging.report_to {name!r} is not one of {', '.join(TRACKERS)}")


@dataclasses.dataclass
class TrainConfig:
    model: str = REAL_MODEL_ID
    """Base model: hub id or a diffusers-layout folder (only transformer/ and
    scheduler/ are read for training; vae/ and text_encoder/ for validation)."""
    components: str | None = None
    """Where the VAE, T5, tokenizer and scheduler come from when ``model`` is a
    transformer alone (a pipeline folder or hub id); null = what the dataset was
    prepared with (dataset.json records it), else the model's own or its family's."""
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
    ema: EmaSection = dataclasses.field(default_factory=EmaSection)
    evaluation: EvaluationSection = dataclasses.field(default_factory=EvaluationSection)
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
