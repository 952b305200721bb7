"""GPU check: real-size PixArt-Sigma LoRA training speed and memory, and T5-XXL caching speed.

One script for one GPU (made for an NVIDIA H200; under 8 minutes, no network). It
measures the toolkit's own pieces (``inject_lora``, the ``diffusion`` loss functions,
``build_optimizer``, ``plan_memory``, the ``TextEncoder`` of ``prepare``) on the
real-size XL-2 architecture, randomly initialised in bf16 (no weights needed).

* **Environment first**: before any GPU time, every module the check imports, a
  bitsandbytes with kernels for this CUDA and enough free GPU memory; if anything
  is missing it exits (code 2) with one line naming all of it. ``--check-env``
  stops there.
* **Training**, 1024 px first, then 512 and 2048, x batch 1 and 4 x gradient
  checkpointing off and on (base rows: rank-16 attention LoRA in fp32 as PEFT runs
  it, 8-bit AdamW, eager), then variants at 1024 px batch 4 without checkpointing:
  bf16 LoRA compute (autocast, fp32 master weights), fused AdamW, and bf16 LoRA +
  ``torch.compile`` of each block. Rows the plan puts within 24 GB, and the bf16
  LoRA row that claims to fit, run with the allocator capped at 24 GB less the
  memory outside it (``set_per_process_memory_fraction``): fits or OOM. Per row:
  SDPA backend per call (the dispatcher's choice), compile, LoRA compute, optimizer
  as run, TF32; host time to issue a step and GPU time (CUDA events); peak allocated
  and reserved; the process peak; MFU (FLOPs counted by ``FlopCounterMode`` on the
  meta device: 15.66 TFLOP per 1024 px sample) and HFU (the recomputed forward
  counted); ``pixart-tune plan`` beside it. An OOM or error is recorded and the
  rest go on; no row starts within ``row_budget`` of ``--time-limit``.
* **Through the Trainer**, the last training row: ``pixart-tune train`` itself
  (dataloader, accelerate, the loop) on a random prepared dataset at the goal's size,
  ``gradient_checkpointing: auto`` and bf16 LoRA, capped at 24 GB (``bench/gpu_trainer.py``).
* **T5-XXL caching**, last, in a subprocess capped at ``--t5-cap`` seconds: the
  T5 v1.1 XXL encoder (random init) through ``prepare``'s loader, 8-bit when
  bitsandbytes runs, 300-token prompts in batches of 32: prompts/s.

The report is a markdown file (``--out``, default stdout) with date, commit, GPU and
library versions, and a JSON of the raw numbers beside it (``--json``, default the
``--out`` path with ``.json``). Progress goes to stderr, flushed.

    python bench/gpu_check.py --out gpu_check.md            # everything (under 8 minutes on an H200)
    python bench/gpu_check.py --only 1024 --steps 3         # a quick rerun of 1024 px
    python bench/gpu_check.py --tiny                         # CPU run of every code path (under a minute)

**No network on the GPU machine.** It needs Python 3.12 with PyTorch (CUDA) and this
repository (run from its root; it is not installed). Everything else travels as
wheels: ``bash bench/gpu_wheels.sh .whl 3.12`` downloads the list in
``bench/gpu_wheels.txt`` (no torch; under 60 MiB), ``bench/gpu_preflight.py``
proves on a CPU that the set installs beside torch alone and runs ``--tiny``, and on
the GPU machine::

    python3 -m pip install --no-index --no-deps .whl/*.whl
    python3 bench/gpu_check.py --out gpu_check.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
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
    RANK,
    TOKENS,
    Setting,
    TrainResult,
    VARIANTS,
    describe,
    device_name,
    environment_problems,
    free_memory,
    is_oom,  # noqa: F401  (part of the check's interface: tests call gpu_check.is_oom)
    library_versions,
    log,
    raw_numbers,
    record_failure,
    record_plan,
    record_sdpa,
    report,
    summary,
    synchronize,
)
from bench.gpu_t5 import t5_bench, t5_in_subprocess, write_result  # noqa: E402
from bench.gpu_trainer import ROW_BUDGET_S, run_trainer_row  # noqa: E402


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
            if resolution == self.setting.resolutions[0]:
                # Variants at the goal's size (largest batch, no checkpointing): what each change buys.
                configs += [TrainResult(resolution, max(self.setting.batches), False, v) for v in self.setting.variants]
            if time.monotonic() > self.setting.deadline:
                results += [dataclasses.replace(r, status="skipped (time limit)") for r in configs]
                continue
            log(f"[train] building the {'tiny' if self.setting.tiny else 'XL-2'} transformer for {resolution} px ...")
            try:
                flops, forward_flops = self.count_flops(resolution, with_forward=True)
                transformer = self.build(resolution)
            except Exception as error:
                log(traceback.format_exc())
                results += [dataclasses.replace(r, status=f"error ({type(error).__name__}: {error})") for r in configs]
                free_memory(self.device)
                continue
            for result in configs:
                results.append(result)
                from pixart_tune.training.optim import resolve_name

                result.optimizer = resolve_name(result.variant.optimizer, self.device)
                result.model_tflop_per_step = flops * result.batch / 1e12
                result.recompute_tflop_per_step = forward_flops * result.batch / 1e12 if result.checkpointing else 0.0
                self.plan(result)
                if time.monotonic() > self.setting.deadline - self.setting.row_budget:
                    result.status = "skipped (time limit)"
                    continue
                self.measure(self.compiled(transformer) if result.variant.compile else transformer, result)
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

    def compiled(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """Regional compilation: each transformer block compiled in place (one graph, reused 28 times)."""
        for block in transformer.transformer_blocks:
            if not getattr(block, "_compiled_call_impl", None):
                block.compile(backend=self.setting.compile_backend)
        return transformer

    def count_flops(self, resolution: int, with_forward: bool = False):
        """FLOPs of one batch-1 training forward + backward (no recomputation), on the meta device.

        With ``with_forward``, (forward + backward, forward): the forward is what
        gradient checkpointing runs a second time."""
        from torch.utils.flop_counter import FlopCounterMode

        from pixart_tune.adapters.lora import LoraSettings, inject_lora
        from pixart_tune.models import meta_transformer

        with default_dtype(self.dtype):
            transformer = meta_transformer(self.setting.transformer_config(resolution))
        inject_lora(transformer, LoraSettings(rank=RANK, alpha=RANK, targets="attention"))
        inputs = self.inputs(transformer.config, resolution, 1, torch.device("meta"))
        with FlopCounterMode(display=False) as counter:
            output = self.forward(transformer, *inputs, timesteps=torch.zeros(1, dtype=torch.long, device="meta"))
            forward = float(counter.get_total_flops())
            output.float().pow(2).mean().backward()
        total = float(counter.get_total_flops())
        return (total, forward) if with_forward else total

    def plan(self, result: TrainResult) -> None:
        """``pixart-tune plan`` for the same settings (left empty, and said, if it fails)."""
        from pixart_tune.adapters.lora import LoraSettings
        from pixart_tune.training.config import OptimSection, TrainConfig
        from pixart_tune.training.memory import plan_memory

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
        record_plan(result, plan)

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
        result.tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
        capped = self.cap(result)
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

            # bf16 LoRA compute: autocast runs the fp32 LoRA matmuls in bf16; the optimizer keeps fp32 weights.
            autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if result.variant.lora_compute == "bf16" else contextlib.nullcontext

            def step() -> None:
                noise = diffusion.sample_noise(latents, generator)
                timesteps = diffusion.sample_timesteps(result.batch, 1000, generator, device)
                noisy = diffusion.add_noise(scheduler, latents, noise, timesteps)
                with autocast():
                    output = self.forward(transformer, noisy, embeds, mask, timesteps)
                loss = diffusion.diffusion_loss(output, noise, timesteps, scheduler, min_snr_gamma=5.0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # The first step compiles (when asked) and names the attention kernels; not timed.
            counts: dict[str, int] = {}
            start = time.perf_counter()
            with contextlib.nullcontext() if result.variant.compile else record_sdpa(counts):
                step()
            synchronize(device)
            if result.variant.compile:
                result.compile_seconds = time.perf_counter() - start
            result.sdpa = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "(compiled: not recorded)"
            for _ in range(self.setting.warmup - 1):
                step()
            synchronize(device)
            # Steps run back to back as in training (no host sync between them); on CUDA,
            # events in the stream split the block into per-step times.
            marks = [StepMark(device) for _ in range(self.setting.steps + 1)]
            start = time.perf_counter()
            marks[0].record()
            for mark in marks[1:]:
                issued = time.perf_counter()
                step()
                result.host_seconds.append(time.perf_counter() - issued)
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
            record_failure(result, error, device)
        finally:
            optimizer = None  # its state is freed with the gradients below
            for p in transformer.parameters():
                p.grad = None
            free_memory(device)
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, device)

    def cap(self, result: TrainResult) -> bool:
        """Caps the allocator at the fit budget when the plan says the row fits it: fits-or-OOM, not a reading."""
        if self.device.type != "cuda":
            return False
        if not result.variant.cap and (result.plan_total is None or result.plan_total > FIT_BUDGET_GIB):
            return False
        free_memory(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # The budget is the whole card's: the CUDA context and kernel modules outside the allocator count too.
        outside = total - free - torch.cuda.memory_reserved(self.device)
        result.cap_gib = (FIT_BUDGET_GIB * GIB - outside) / GIB
        torch.cuda.set_per_process_memory_fraction(max(result.cap_gib * GIB / total, 0.01), self.device)
        return True


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
    parser.add_argument("--json", type=Path, help="raw numbers as JSON (default: the --out path with .json)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, 2 steps: checks every code path in seconds")
    parser.add_argument("--check-env", action="store_true", help="only check the environment (imports, versions, free memory) and exit")
    parser.add_argument("--only", help="comma-separated resolutions to run, e.g. 1024 (default: 512,1024,2048; tiny: 256,512)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; tiny: 1,2)")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing modes: off, on or off,on")
    parser.add_argument("--no-variants", action="store_true", help="no bf16-LoRA / fused-AdamW / compile rows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, the first compiles (default 2; tiny: 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help=f"peak dense bf16 TFLOP/s for MFU (default {H200_BF16_DENSE_TFLOPS:g} on CUDA)")
    parser.add_argument("--t5-prompts", type=int, default=None, help="prompts encoded by T5 (default 256; tiny: 8)")
    parser.add_argument("--skip-t5", action="store_true", help="no T5 caching measurement")
    parser.add_argument("--t5-cap", type=float, default=None, help="seconds the T5 subprocess may run, load included (default 120)")
    parser.add_argument("--t5-only", action="store_true", help=argparse.SUPPRESS)  # the T5 subprocess
    parser.add_argument("--t5-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, default=300,
                        help="seconds after which no new training row starts (default 300; the last row, T5 (capped at 120 s) and the report follow: under 8 minutes in all)")
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
        variants=() if args.no_variants else VARIANTS,
        # A 2048 px batch-4 row is ~10 s of steps on an H200; a compiled row adds its compile time.
        row_budget=0.0 if args.tiny else 20.0,
        compile_backend="aot_eager" if device.type == "cpu" else "inductor",
        t5_cap=args.t5_cap or 120.0,
    )
    if setting.steps < 1 or setting.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args, setting = parse(argv)
    # Before any GPU time: everything imports, bitsandbytes has kernels for this CUDA, the GPU is free.
    problems = environment_problems(setting.device, setting.tiny)
    if problems:
        print(f"gpu_check: environment not ready: missing or unusable: {'; '.join(problems)} "
              "(install the wheel set: docs/benchmarks.md, section 5)", file=sys.stderr, flush=True)
        return 2
    if args.check_env:
        print(f"gpu_check: environment ready: {device_name(setting.device)}; "
              + ", ".join(f"{k} {v}" for k, v in library_versions().items()), flush=True)
        return 0
    if args.t5_only:
        with run_environment(setting):
            write_result(t5_bench(setting), args.t5_json)
        return 0
    log(f"gpu_check on {device_name(setting.device)}; resolutions {setting.resolutions}, batches {setting.batches}")
    with run_environment(setting):
        bench, train_note = guarded("training", [], lambda: TrainingBench(setting))
        train: list[TrainResult] = []
        if bench is not None:
            # The grid stops early enough to leave the Trainer row its time.
            bench.setting = dataclasses.replace(setting, deadline=setting.deadline - (0.0 if setting.tiny else ROW_BUDGET_S))
            train, train_note = guarded("training", [], lambda: bench.run(setting.resolutions))
            # Last training row: `pixart-tune train` itself (dataloader, accelerate) at the goal's size.
            row, note = guarded("Trainer row", [], lambda: run_trainer_row(setting, bench, setting.resolutions[0], max(setting.batches)))
            train, train_note = [*(train or []), *([row] if row is not None else [])], "; ".join(n for n in (train_note, note) if n)
        train = sorted(train or [], key=lambda r: (r.variant.name != "base", r.resolution, r.batch, r.checkpointing))
        free_memory(setting.device)
    # T5 last, in its own process: capped in time, and its memory leaves with it.
    t5, t5_note = None, "T5 caching skipped (--skip-t5)"
    if not args.skip_t5:
        t5, t5_note = t5_in_subprocess(argv, setting.t5_cap), ""
    seconds = time.monotonic() - start
    text = report(setting, train, train_note, t5, t5_note, seconds)
    json_path = args.json or (args.out.with_suffix(".json") if args.out else None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        log(f"report written to {args.out}")
    else:
        print(text, flush=True)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(raw_numbers(setting, train, t5, seconds), indent=1), encoding="utf-8")
        log(f"raw numbers written to {json_path}")
    print(summary(setting, train), file=sys.stderr if not args.out else sys.stdout, flush=True)
    failed = bool(train_note) or any(r.status.startswith("error") for r in train) or (t5 is not None and t5.status.startswith("error"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
