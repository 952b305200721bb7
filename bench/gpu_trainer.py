"""The GPU check's row through the real ``Trainer``: ``pixart-tune train``'s own speed.

The other rows time a bare step; this one runs ``pixart_tune.training.trainer`` as
the train command does (dataloader reading the cache from disk, accelerate's
``accumulate`` and gradient clipping, the LR schedule, the loop's bookkeeping) on:

* a model folder (diffusers layout) around the check's transformer, randomly
  initialised in the base dtype (``bench.common.build_model_folder``);
* a prepared dataset in the real cache format, written through ``FeatureCache`` and
  ``Manifest``: random latents at the square bucket of the row's resolution (the
  shape the other rows time) and random T5 embeddings of the model's caption width,
  300 tokens each, plus the empty prompt for caption dropout;
* the recipe ``recipes/style_lora_1024_24gb.yaml`` with overrides: that model and
  dataset, ``gradient_checkpointing=auto`` (what ``plan`` says fits its 24 GB budget),
  ``lora_compute_dtype=base``, no validation, TensorBoard or checkpoints, ``warmup +
  steps`` optimizer steps, one log point at the end.

Steps are marked where the loop enters ``train_step`` (CUDA events on a GPU, the
wall clock on a CPU), so a step's time holds everything the loop does between two
steps, the next batch from the dataloader included. The row runs under the 24 GB
allocator cap (its settings are the plan's claim that it fits) and is reported with
the variants, named "through Trainer".
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.gpu_env import DTYPE_NAMES, GIB, TOKENS, TrainResult, Variant, free_memory, log, record_failure, record_plan, record_sdpa, synchronize

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "style_lora_1024_24gb.yaml"
NAME = "through Trainer"
ROW_BUDGET_S = 60.0
"""Seconds kept for this row on a GPU: model folder (1.2 GB written and read back), dataset, set-up and steps."""


def trainer_variant(dtype: torch.dtype) -> Variant:
    """The row's settings as the other rows name them: LoRA in the base dtype, the recipe's 8-bit AdamW, eager, capped."""
    return Variant(NAME, lora_compute=DTYPE_NAMES[dtype], optimizer="adamw8bit", cap=True)


def write_dataset(root: Path, model: Path, resolution: int, items: int, latent_channels: int, caption_channels: int, dtype: torch.dtype, seed: int = 0) -> Path:
    """A prepared dataset of random features in the cache format ``prepare`` writes (one bucket, full-length captions)."""
    from pixart_tune.data.buckets import nearest_bucket
    from pixart_tune.data.cache import CacheItem, FeatureCache, Manifest, content_key
    from pixart_tune.training.dataset import model_text_fingerprint, model_vae_scaling_factor

    cache = FeatureCache(root)
    generator = torch.Generator().manual_seed(seed)
    bucket = nearest_bucket(resolution, resolution, resolution)
    full = torch.ones(TOKENS, dtype=torch.long)
    empty_key = content_key("text", "", "random")
    # The empty prompt as T5 leaves it: one valid token (its end-of-sequence).
    cache.write_text(empty_key, torch.randn(TOKENS, caption_channels, generator=generator).to(dtype), torch.nn.functional.pad(full[:1], (0, TOKENS - 1)))
    entries = []
    for index in range(items):
        source = f"random_{index:04d}.png"
        latent_key = content_key("latent", source, f"{bucket[0]}x{bucket[1]}", "random")
        text_key = content_key("text", source, "random")
        cache.write_latent(latent_key, torch.randn(latent_channels, bucket[0] // 8, bucket[1] // 8, generator=generator))
        cache.write_text(text_key, torch.randn(TOKENS, caption_channels, generator=generator).to(dtype), full)
        entries.append(CacheItem(source, (f"random caption {index}",), bucket, latent_key, (text_key,)))
    cache.write_manifest(Manifest(
        model=str(model), resolution=resolution, latent_channels=latent_channels, caption_channels=caption_channels,
        max_tokens=TOKENS, vae_scaling_factor=model_vae_scaling_factor(str(model)), empty_text_key=empty_key, items=entries,
        text_encoder=model_text_fingerprint(str(model)) or "",
    ))
    return root


def trainer_config(model: Path, data: Path, out: Path, resolution: int, batch: int, steps: int, dtype: torch.dtype):
    """The 24 GB style recipe on the random model and dataset, for ``steps`` optimizer steps and one log point."""
    from pixart_tune.training.config import load_train_config

    return load_train_config(RECIPE, [
        f"model={model}", f"data.path={data}", f"output_dir={out}", f"resolution={resolution}", f"dtype={DTYPE_NAMES[dtype]}", f"data.batch_size={batch}",
        "gradient_checkpointing=auto", "lora_compute_dtype=base", "validation.prompts=[]", "validation.every=0", "logging.report_to=[]",
        f"logging.every={steps}", "checkpoint.every=0", f"schedule.steps={steps}", "schedule.warmup_steps=0",
    ])


class _Marks:
    """Where the loop entered ``train_step``, and where the last step returned: host clock and CUDA event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: list[float] = []
        self.events: list[torch.cuda.Event] = []

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def step_seconds(self, first: int) -> list[float]:
        """Per step from step ``first`` on: GPU time between marks on CUDA (after a synchronize), else wall time."""
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.events[first:], self.events[first + 1:])]
        return self.host_seconds(first)

    def host_seconds(self, first: int) -> list[float]:
        return [b - a for a, b in zip(self.host[first:], self.host[first + 1:])]


def run_trainer_row(setting, bench, resolution: int, batch: int) -> TrainResult:
    """The row through ``Trainer`` at ``resolution`` and ``batch``; ``bench`` (the check's ``TrainingBench``) counts FLOPs and caps memory.

    An OOM or error is recorded in the row, as the other rows do; the temporary
    folders leave with it.
    """
    from pixart_tune.training.optim import resolve_name

    device = setting.device
    result = TrainResult(resolution, batch, False, trainer_variant(setting.dtype))
    result.optimizer = resolve_name(result.variant.optimizer, device)
    if time.monotonic() > setting.deadline - setting.row_budget:
        result.status = "skipped (time limit)"
        return result
    with tempfile.TemporaryDirectory(prefix="gpu_check_trainer_") as tmp:
        work = Path(tmp)
        try:
            _measure(setting, bench, work, result)
        except Exception as error:
            record_failure(result, error, device)
        finally:
            free_memory(device)
            if result.cap_gib is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


def _measure(setting, bench, work: Path, result: TrainResult) -> None:
    from bench.common import build_model_folder
    from pixart_tune.training.trainer import Trainer

    device, resolution, batch = setting.device, result.resolution, result.batch
    transformer_config = setting.transformer_config(resolution)
    log(f"[trainer] model folder and a random {resolution} px dataset in {work} ...")
    model = build_model_folder(work / "model", transformer_config, transformer_config["caption_channels"], dtype=setting.dtype)
    data = write_dataset(work / "data", model, resolution, 2 * batch, transformer_config["in_channels"], transformer_config["caption_channels"], setting.dtype)
    steps = setting.warmup + setting.steps
    config = trainer_config(model, data, work / "run", resolution, batch, steps, setting.dtype)
    flops, forward_flops = bench.count_flops(resolution, with_forward=True)
    result.model_tflop_per_step = flops * batch / 1e12
    result.tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    _plan(config, resolution, transformer_config, result)
    bench.cap(result)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(config, progress=False)
    # accelerate picks the GPU when there is one: a CPU run (--tiny) says so.
    with _environ("ACCELERATE_USE_CPU", "true" if device.type == "cpu" else None):
        trainer.setup()
    try:
        if trainer.device.type != device.type:
            raise RuntimeError(f"the Trainer chose {trainer.device}, the check runs on {device}")
        layers = len(trainer.transformer.transformer_blocks)
        checkpointed = len(trainer.checkpointed_blocks)
        result.checkpointing = checkpointed > 0
        # Each checkpointed block runs its forward again (the blocks hold nearly all of the forward's FLOPs).
        result.recompute_tflop_per_step = forward_flops * batch / 1e12 * checkpointed / layers
        marks, counts = _Marks(device), {}
        step = trainer.train_step

        def marked_step(batch_):
            marks.mark()
            # The first step names the attention kernels; the last one's end closes the timed block.
            with record_sdpa(counts) if len(marks.host) == 1 else contextlib.nullcontext():
                loss = step(batch_)
            if trainer.state.step >= steps:
                marks.mark()
            return loss

        trainer.train_step = marked_step  # the loop calls self.train_step
        # The loss plot after the steps needs matplotlib, which the GPU wheel set leaves out (bench/gpu_wheels.txt).
        trainer.plot_loss = lambda: None
        trainer.train()
        synchronize(device)
        result.sdpa = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        result.step_seconds = marks.step_seconds(setting.warmup)
        result.host_seconds = marks.host_seconds(setting.warmup)
        timed = len(result.step_seconds)
        if timed < 1:
            raise RuntimeError(f"{steps} steps leave no timed step after {setting.warmup} warm-up steps")
        result.samples_per_s = batch * timed / sum(result.step_seconds)
        if device.type == "cuda":
            result.peak_allocated = torch.cuda.max_memory_allocated(device) / GIB
            result.peak_reserved = torch.cuda.max_memory_reserved(device) / GIB
            free, total = torch.cuda.mem_get_info(device)
            result.process_peak = (total - free - torch.cuda.memory_reserved(device) + torch.cuda.max_memory_reserved(device)) / GIB
        log(f"[trainer] {resolution} px batch {batch} through Trainer ({checkpointed} of {layers} blocks checkpointed, "
            f"{config.optim.name} -> {result.optimizer}): {result.samples_per_s:.2f} samples/s")
    finally:
        trainer.cleanup()
        del trainer


def _plan(config, resolution: int, transformer_config: dict, result: TrainResult) -> None:
    """What ``gradient_checkpointing: auto`` chooses and ``plan`` predicts for it (left empty, and said, if it fails)."""
    from pixart_tune.training.autoplan import resolve_auto
    from pixart_tune.training.memory import plan_memory

    try:
        resolved, _ = resolve_auto(config, resolution)
        plan = plan_memory(resolved, resolution, transformer_config=transformer_config)
    except Exception:
        log(traceback.format_exc())
        return
    record_plan(result, plan)


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """``name`` set to ``value`` (left as it is when None) for the block, then restored."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
