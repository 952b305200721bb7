"""GPU check: real-size PixArt-Sigma LoRA training speed and memory, and T5-XXL caching speed.

One script for one GPU (made for an NVIDIA H200; under 8 minutes, no network). It
measures the toolkit's own pieces (``inject_lora``, the ``diffusion`` loss functions,
``build_optimizer``, ``plan_memory``, the ``TextEncoder`` of ``prepare``) on the
real-size XL-2 architecture, randomly initialised in bf16 (no weights needed):

* **training**, for 512, 1024 and 2048 px x batch 1 and 4 x gradient checkpointing
  off and on: rank-16 attention LoRA, 8-bit AdamW when bitsandbytes runs (else
  PyTorch AdamW, named in the table), min-SNR loss and gradient clipping as the
  trainer does, 300-token captions. Per configuration: peak allocated and reserved
  VRAM (``torch.cuda.max_memory_*`` after a reset; warm-up included, as it
  allocates the optimizer state); the process's peak (memory outside the allocator,
  i.e. CUDA context and kernel modules, + peak reserved: what ``nvidia-smi``
  shows); samples/s over ``--steps`` back-to-back steps after ``--warmup``
  (``cuda.synchronize`` around them, CUDA events between them); model FLOP
  utilisation (FLOPs of one forward + backward counted by ``FlopCounterMode`` on
  the meta device, recomputation excluded, over ``--peak-tflops``); and
  ``pixart-tune plan``'s prediction beside it with the % difference. A
  configuration that runs out of memory is recorded as OOM and the rest go on; so
  does any other failure.
* **T5-XXL caching**: the T5 v1.1 XXL encoder (4.7 B parameters, random init)
  loaded by ``prepare``'s own loader, in 8-bit when bitsandbytes is importable (the
  random weights are saved once and loaded with ``load_in_8bit``, as a real
  checkpoint would be; else bf16, said in the table), encoding 300-token prompts
  in ``prepare``'s batches of 32: prompts/s.

The report is a markdown file (``--out``, default stdout) with the date, the git
commit, the GPU and the library versions. Progress goes to stderr, flushed.

    python bench/gpu_check.py --out gpu_check.md            # everything (about 4-6 minutes on an H200)
    python bench/gpu_check.py --only 1024 --steps 3         # a quick rerun of 1024 px
    python bench/gpu_check.py --tiny                         # CPU smoke run of every code path (seconds)

**No network on the GPU machine.** The script needs PyTorch with CUDA and this
repository (run it from the repository root). It measures what is importable:
without diffusers or peft there is no training section, without bitsandbytes it
uses AdamW and a bf16 T5 (and says so). To bring the libraries along, download
their wheels on a machine with network and install them offline::

    pip download --no-deps -d wheels/ diffusers==0.42.* peft==0.21.* accelerate==1.15.* \\
        transformers==5.24.* bitsandbytes==0.50.* safetensors huggingface_hub tokenizers sentencepiece
    # copy wheels/ and the repository to the GPU machine, then:
    pip install --no-index --find-links wheels/ wheels/*.whl
    python bench/gpu_check.py --out gpu_check.md

(bitsandbytes' manylinux wheel carries its CUDA kernels; pick the ``--platform`` /
``--python-version`` of the GPU machine if it differs from the download machine.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import default_dtype  # noqa: E402
from bench.gpu_env import (  # noqa: E402
    DTYPE_NAMES,
    FIT_BUDGET_GIB,
    GIB,
    H200_BF16_DENSE_TFLOPS,
    LOW_MEMORY_GOAL_GIB,
    PLAN_GOAL,
    RANK,
    SPEED_GOAL,
    TOKENS,
    Setting,
    TrainResult,
    device_name,
    free_memory,
    is_oom,
    library_versions,
    log,
    synchronize,
)
from bench.gpu_t5 import T5Result, t5_bench  # noqa: E402


# --- training ------------------------------------------------------------------------


class TrainingBench:
    """One real-size transformer per resolution; one optimizer per configuration."""

    def __init__(self, setting: Setting):
        from pixart_tune.training.optim import resolve_name

        self.setting = setting
        self.device = setting.device
        self.dtype = setting.dtype
        # adamw8bit when bitsandbytes really steps on this device, else adamw.
        self.optimizer_name = resolve_name("adamw8bit", self.device)

    def run(self, resolutions: list[int]) -> list[TrainResult]:
        results = []
        for resolution in resolutions:
            configs = [TrainResult(resolution, b, c) for b in self.setting.batches for c in self.setting.checkpointing]
            if time.monotonic() > self.setting.deadline:
                results += [dataclasses.replace(r, status="skipped (time limit)") for r in configs]
                continue
            log(f"[train] building the {'tiny' if self.setting.tiny else 'XL-2'} transformer for {resolution} px ...")
            try:
                flops = self.count_flops(resolution)
                transformer = self.build(resolution)
            except Exception as error:
                log(traceback.format_exc())
                results += [dataclasses.replace(r, status=f"error ({type(error).__name__}: {error})") for r in configs]
                free_memory(self.device)
                continue
            for result in configs:
                results.append(result)
                result.optimizer = self.optimizer_name
                result.model_tflop_per_step = flops * result.batch / 1e12
                self.plan(result)
                if time.monotonic() > self.setting.deadline:
                    result.status = "skipped (time limit)"
                    continue
                self.measure(transformer, result)
                log(f"[train] {describe(result)}")
            del transformer
            free_memory(self.device)
        return results

    def build(self, resolution: int) -> torch.nn.Module:
        from diffusers import PixArtTransformer2DModel

        from pixart_tune.adapters.lora import LoraSettings, inject_lora

        # Initialised directly on the device in bf16: no fp32 copy, no host transfer.
        with default_dtype(self.dtype), torch.device(self.device):
            transformer = PixArtTransformer2DModel.from_config(self.setting.transformer_config(resolution))
        inject_lora(transformer, LoraSettings(rank=RANK, alpha=RANK, targets="attention"))
        # Any buffer made outside the device context (e.g. from numpy) joins the rest.
        return transformer.to(self.device).train()

    def count_flops(self, resolution: int) -> float:
        """FLOPs of one batch-1 training forward + backward (no recomputation), on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        from pixart_tune.adapters.lora import LoraSettings, inject_lora
        from pixart_tune.models import meta_transformer

        with default_dtype(self.dtype):
            transformer = meta_transformer(self.setting.transformer_config(resolution))
        inject_lora(transformer, LoraSettings(rank=RANK, alpha=RANK, targets="attention"))
        inputs = self.inputs(transformer.config, resolution, 1, torch.device("meta"))
        with FlopCounterMode(display=False) as counter:
            output = self.forward(transformer, *inputs, timesteps=torch.zeros(1, dtype=torch.long, device="meta"))
            output.float().pow(2).mean().backward()
        return float(counter.get_total_flops())

    def plan(self, result: TrainResult) -> None:
        """``pixart-tune plan`` for the same settings (left empty, and said, if it fails)."""
        from pixart_tune.adapters.lora import LoraSettings
        from pixart_tune.training.config import OptimSection, TrainConfig
        from pixart_tune.training.memory import CONTEXT_RESERVE_GIB, plan_memory

        config = TrainConfig(
            model="PixArt-Sigma-XL-2 (random init)", dtype=DTYPE_NAMES[self.dtype], gradient_checkpointing=result.checkpointing,
            lora=LoraSettings(rank=RANK, alpha=RANK, targets="attention"), optim=OptimSection(name=result.optimizer),
        )
        config.data.batch_size = result.batch
        try:
            plan = plan_memory(config, result.resolution, transformer_config=self.setting.transformer_config(result.resolution))
        except Exception:
            log(traceback.format_exc())
            return
        # What torch's allocator itself holds: the plan less its CUDA context and fragmentation.
        fragmentation = sum(size for name, size in plan.rows if name.startswith("allocator fragmentation"))
        result.plan_total = plan.total_bytes / GIB
        result.plan_allocated = (plan.total_bytes - CONTEXT_RESERVE_GIB * GIB - fragmentation) / GIB

    def inputs(self, config, resolution: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A cached batch as the trainer gets it: fp32 latents, bf16 300-token embeddings, mask."""
        latents = torch.randn(batch, config.in_channels, resolution // 8, resolution // 8, device=device)
        embeds = torch.randn(batch, TOKENS, config.caption_channels, device=device, dtype=self.dtype)
        mask = torch.ones(batch, TOKENS, device=device, dtype=torch.long)
        return latents, embeds, mask

    def forward(self, transformer, latents, embeds, mask, timesteps) -> torch.Tensor:
        return transformer(
            latents.to(self.dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]

    def measure(self, transformer: torch.nn.Module, result: TrainResult) -> None:
        from diffusers import DDPMScheduler

        from pixart_tune.adapters.lora import trainable_parameters
        from pixart_tune.training import diffusion
        from pixart_tune.training.config import OptimSection
        from pixart_tune.training.optim import build_optimizer

        device = self.device
        optimizer = None
        try:
            if result.checkpointing:
                transformer.enable_gradient_checkpointing()
            else:
                transformer.disable_gradient_checkpointing()
            params = trainable_parameters(transformer)
            for p in params:
                p.grad = None
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            optimizer = build_optimizer(params, OptimSection(name=result.optimizer, lr=1e-4), device)
            # PixArt-Sigma's training schedule (linear DDPM betas), its tables on the device.
            scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
            latents, embeds, mask = self.inputs(transformer.config, result.resolution, result.batch, device)
            generator = torch.Generator(device=device).manual_seed(0)

            def step() -> None:
                noise = diffusion.sample_noise(latents, generator)
                timesteps = diffusion.sample_timesteps(result.batch, 1000, generator, device)
                noisy = diffusion.add_noise(scheduler, latents, noise, timesteps)
                output = self.forward(transformer, noisy, embeds, mask, timesteps)
                loss = diffusion.diffusion_loss(output, noise, timesteps, scheduler, min_snr_gamma=5.0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(self.setting.warmup):
                step()
            synchronize(device)
            # Steps run back to back as in training (no host sync between them); on CUDA,
            # events in the stream split the block into per-step times.
            marks = [StepMark(device) for _ in range(self.setting.steps + 1)]
            start = time.perf_counter()
            marks[0].record()
            for mark in marks[1:]:
                step()
                mark.record()
            synchronize(device)
            seconds = time.perf_counter() - start
            result.step_seconds = [b.seconds_since(a) for a, b in zip(marks, marks[1:])]
            result.samples_per_s = result.batch * self.setting.steps / seconds
            if device.type == "cuda":
                result.peak_allocated = torch.cuda.max_memory_allocated(device) / GIB
                result.peak_reserved = torch.cuda.max_memory_reserved(device) / GIB
                # Device memory outside torch's allocator (CUDA context, loaded kernel modules),
                # measured now that every kernel of the step has run once, + the allocator's peak.
                free, total = torch.cuda.mem_get_info(device)
                outside = total - free - torch.cuda.memory_reserved(device)
                result.process_peak = (outside + torch.cuda.max_memory_reserved(device)) / GIB
        except Exception as error:
            if is_oom(error):
                result.status = "OOM"
            else:
                log(traceback.format_exc())
                result.status = f"error ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
            if device.type == "cuda":
                result.peak_allocated = torch.cuda.max_memory_allocated(device) / GIB
        finally:
            optimizer = None  # its state is freed with the gradients below
            for p in transformer.parameters():
                p.grad = None
            free_memory(device)


class StepMark:
    """A point in time: a CUDA event on a GPU (no host sync), the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.time = 0.0

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.time = time.perf_counter()

    def seconds_since(self, earlier: "StepMark") -> float:
        if self.event is not None:
            return earlier.event.elapsed_time(self.event) / 1000  # after a synchronize
        return self.time - earlier.time


def describe(result: TrainResult) -> str:
    mode = "ckpt on" if result.checkpointing else "ckpt off"
    head = f"{result.resolution} px batch {result.batch} {mode}"
    if result.status != "ok":
        return f"{head}: {result.status}"
    memory = f", peak allocated {result.peak_allocated:.2f} GiB" if result.peak_allocated is not None else ""
    return f"{head}: {result.samples_per_s:.2f} samples/s{memory}, plan {result.plan_total:.2f} GiB"


# --- report --------------------------------------------------------------------------


def pct(plan: float | None, measured: float | None) -> str:
    if plan is None or not measured:
        return "n/a"
    return f"{(plan - measured) / measured * 100:+.0f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(setting: Setting, train: list[TrainResult], train_note: str, t5: T5Result | None, t5_note: str, seconds: float) -> str:
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
        f"LoRA rank {RANK} on attention (fp32), min-SNR 5 loss, grad clipping 1.0, {TOKENS}-token captions; "
        f"{setting.warmup} warm-up + {setting.steps} timed steps per configuration",
        "- MFU = model FLOPs of forward + backward (FlopCounterMode, no recomputation) / step time / "
        + (f"{peak:g} TFLOP/s ({'H100/H200 SXM dense BF16 peak' if peak == H200_BF16_DENSE_TFLOPS else 'given peak'})" if peak else "peak (unknown for this device: n/a)"),
        "- peak alloc / reserved: torch.cuda.max_memory_allocated / _reserved over warm-up + timed steps; process = (CUDA context "
        "and kernel modules: device used - reserved, after the steps) + peak reserved, what nvidia-smi would show; plan = `pixart-tune plan` (plan alloc = plan less its CUDA-context and fragmentation rows)",
        "",
    ]
    if train:
        rows = []
        for r in train:
            mfu = "n/a"
            if r.status == "ok" and peak and r.step_time:
                mfu = f"{r.model_tflop_per_step / r.step_time / peak * 100:.1f}%"
            rows.append([
                r.resolution, r.batch, "on" if r.checkpointing else "off", r.optimizer, r.status,
                num(r.samples_per_s), num(r.step_time, 3), f"{r.model_tflop_per_step:.3g}" if r.model_tflop_per_step is not None else "n/a", mfu,
                num(r.peak_allocated), num(r.plan_allocated), pct(r.plan_allocated, r.peak_allocated),
                num(r.peak_reserved), num(r.process_peak), num(r.plan_total), pct(r.plan_total, r.process_peak),
            ])
        lines += ["## Training", "", table(
            ["px", "batch", "grad ckpt", "optimizer", "status", "samples/s", "step s (median)", "TFLOP/step", "MFU",
             "peak alloc GiB", "plan alloc GiB", "plan vs alloc", "peak reserved GiB", "process GiB", "plan GiB", "plan vs process"],
            rows,
        ), ""]
    if train_note:
        lines += [train_note, ""]
    if t5 is not None:
        lines += ["## T5-XXL caching (prepare's TextEncoder)", "", table(
            ["encoder", "parameters", "precision", "status", "batch", "prompts", "load s", "prompts/s", "peak alloc GiB"],
            [["T5 v1.1 XXL (random)" if not setting.tiny else "tiny T5", f"{t5.parameters / 1e9:.2f} B" if not setting.tiny else f"{t5.parameters:,}",
              t5.precision, t5.status, t5.batch, t5.prompts, num(t5.load_seconds, 1), num(t5.prompts_per_s, 1), num(t5.peak_allocated)]],
        ), ""]
    if t5_note:
        lines += [t5_note, ""]
    lines += [f"**{summary(setting, train)}**", ""]
    return "\n".join(lines)


def summary(setting: Setting, train: list[TrainResult]) -> str:
    """The one-line figure against the goals (1024 px, batch 4)."""
    if setting.tiny:
        ok = sum(r.status == "ok" for r in train)
        return f"gpu_check --tiny: {ok} of {len(train)} training configurations ran (a code-path check on tiny models; its numbers mean nothing)"
    resolution = max(setting.resolutions, key=lambda r: (r == 1024, -abs(r - 1024)))
    batch = max(setting.batches)
    ok = [r for r in train if r.status == "ok" and r.resolution == resolution and r.batch == batch]
    parts = [f"gpu_check at {resolution} px batch {batch}:"]
    fits = [r for r in ok if r.process_peak is None or r.process_peak <= FIT_BUDGET_GIB]
    if fits:
        best = max(fits, key=lambda r: r.samples_per_s or 0)
        parts.append(f"{best.samples_per_s:.2f} samples/s (ckpt {'on' if best.checkpointing else 'off'}; goal >= {SPEED_GOAL:g} within {FIT_BUDGET_GIB:g} GB)")
    low = [r for r in ok if r.checkpointing and r.peak_allocated is not None]
    if low:
        parts.append(f"low-memory peak {low[0].peak_allocated:.2f} GiB allocated (goal <= {LOW_MEMORY_GOAL_GIB:g})")
    diffs = [abs(r.plan_total - r.process_peak) / r.process_peak for r in train if r.status == "ok" and r.process_peak]
    if diffs:
        parts.append(f"plan within {max(diffs) * 100:.0f}% of every measured process peak (goal {PLAN_GOAL * 100:.0f}%)")
    if len(parts) == 1:
        parts.append("no measured configuration")
    return " ".join(parts)


# --- main ----------------------------------------------------------------------------


def guarded(section: str, modules: list[str], run: Callable[[], Any]) -> tuple[Any, str]:
    """Runs a section only when its libraries import; returns (result, note)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:
            missing.append(f"{name} ({type(error).__name__}: {error})")
    if missing:
        return None, f"{section} skipped: cannot import {', '.join(missing)}; see the docstring on bringing wheels along"
    try:
        return run(), ""
    except Exception as error:  # one broken section must not cost the other its numbers
        log(traceback.format_exc())
        return None, f"{section} failed: {type(error).__name__}: {error}"


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Setting]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="markdown report path (default: stdout)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, 2 steps: checks every code path in seconds")
    parser.add_argument("--only", help="comma-separated resolutions to run, e.g. 1024 (default: 512,1024,2048; tiny: 256,512)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; tiny: 1,2)")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing modes: off, on or off,on")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny: 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help=f"peak dense bf16 TFLOP/s for MFU (default {H200_BF16_DENSE_TFLOPS:g} on CUDA)")
    parser.add_argument("--t5-prompts", type=int, default=None, help="prompts encoded by T5 (default 256; tiny: 8)")
    parser.add_argument("--skip-t5", action="store_true", help="no T5 caching measurement")
    parser.add_argument("--time-limit", type=float, default=420, help="seconds after which no new configuration starts (default 420)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available; tiny: cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but PyTorch sees no CUDA device")
    default_res = "256,512" if args.tiny else "512,1024,2048"
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]
    resolutions = ints(args.only or default_res)
    bad = [r for r in resolutions if r not in (256, 512, 1024, 2048)]
    if bad:
        parser.error(f"--only takes 256, 512, 1024 or 2048, got {bad}")
    modes = [m.strip() for m in args.checkpointing.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        parser.error("--checkpointing takes off, on or off,on")
    peak = args.peak_tflops if args.peak_tflops is not None else (H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    setting = Setting(
        tiny=args.tiny,
        device=device,
        # 1024 first: the goals are measured there, so a time limit cuts the others.
        resolutions=sorted(resolutions, key=lambda r: (r != 1024, r)),
        batches=ints(args.batches or ("1,2" if args.tiny else "1,4")),
        checkpointing=[m == "on" for m in modes],
        steps=args.steps or (2 if args.tiny else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 2),
        peak_tflops=peak,
        t5_prompts=args.t5_prompts or (8 if args.tiny else 256),
        t5_batch=4 if args.tiny else 32,
        deadline=time.monotonic() + args.time_limit,
        dtype=torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16,
    )
    if setting.steps < 1 or setting.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, setting


@contextlib.contextmanager
def run_environment(setting: Setting):
    """Quiet library warnings; one CPU thread in tiny mode. Both restored afterwards."""
    restore: list[Callable[[], None]] = []
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            library_logging = importlib.import_module(module)
        except ImportError:
            continue
        # diffusers warns on every .to(dtype), both on every (here deliberately) truncated prompt.
        level = library_logging.get_verbosity()
        library_logging.set_verbosity_error()
        restore.append(lambda lib=library_logging, level=level: lib.set_verbosity(level))
    if setting.tiny and setting.device.type == "cpu":
        # Tiny kernels gain nothing from threads, and on a shared machine a second
        # thread waiting for a busy core makes each step ten times slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        restore.append(lambda: torch.set_num_threads(threads))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args, setting = parse(argv)
    log(f"gpu_check on {device_name(setting.device)}; resolutions {setting.resolutions}, batches {setting.batches}")
    # The goals are measured at 1024 px: it goes first, then T5, then the other sizes,
    # so that a time limit cuts the least important part.
    first, rest = setting.resolutions[:1], setting.resolutions[1:]
    with run_environment(setting):
        bench, train_note = guarded("training", ["diffusers", "peft", "pixart_tune.training.memory"], lambda: TrainingBench(setting))
        train: list[TrainResult] = []
        if bench is not None:
            train, train_note = guarded("training", [], lambda: bench.run(first))
        t5, t5_note = (None, "T5 caching skipped (--skip-t5)") if args.skip_t5 else guarded(
            "T5 caching", ["transformers", "diffusers", "sentencepiece", "pixart_tune.encoders"], lambda: t5_bench(setting)
        )
        if bench is not None and rest and not train_note:
            more, train_note = guarded("training", [], lambda: bench.run(rest))
            train = [*(train or []), *(more or [])]
        train = sorted(train or [], key=lambda r: (r.resolution, r.batch, r.checkpointing))
    text = report(setting, train or [], train_note, t5, t5_note, time.monotonic() - start)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        log(f"report written to {args.out}")
    else:
        print(text, flush=True)
    print(summary(setting, train or []), file=sys.stderr if not args.out else sys.stdout, flush=True)
    failed = bool(train_note) or any(r.status.startswith("error") for r in train or []) or (t5 is not None and t5.status.startswith("error"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
