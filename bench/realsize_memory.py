"""Benchmark 4: a real-size PixArt-Sigma XL-2 LoRA step on the CPU: peak RSS, no T5.

The model folder holds the real XL-2 architecture (28 layers, 16 heads x 72,
4096 caption channels; 610.9 M parameters), randomly initialised and saved in bf16,
next to the tiny VAE and a one-layer T5 of T5-XXL's output width; ``prepare`` caches
two 256 px images with them. Each measured configuration then runs in its own
subprocess (so ``ru_maxrss`` is that run's alone): the real ``Trainer`` of
``pixart-tune train`` (recipe ``style_lora_1024_24gb.yaml`` at 256 px, batch 1,
rank-16 attention LoRA, bf16 base, 8-bit AdamW) sets up and trains a few steps.
The subprocess then proves that no text encoder was loaded: the T5 modelling
module was never imported, no T5 module object exists, and every parameter
resident in the process belongs to the transformer and its LoRA.

Beside each run: ``pixart-tune plan`` for the same settings (a GPU prediction;
the report explains how it differs from a CPU process's RSS).

    python bench/realsize_memory.py          # about 2-3 minutes on 2 CPU cores, 1.2 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "style_lora_1024_24gb.yaml"
T5_MODULE = "transformers.models.t5.modeling_t5"
GIB = 2**30


def overrides(model: Path, data: Path, out: Path, checkpointing: bool, batch_size: int) -> list[str]:
    return [
        f"model={model}", f"data.path={data}", f"output_dir={out}", "resolution=256", f"data.batch_size={batch_size}",
        f"gradient_checkpointing={str(checkpointing).lower()}", "validation.prompts=[]", "validation.every=0",
        "logging.report_to=[]", "checkpoint.every=0",
    ]


def build(work: Path, transformer_config: dict | None = None, caption_channels: int = 4096, dtype=None) -> tuple[Path, Path]:
    """A model folder (default: the XL-2 at 256 px, random bf16) and a two-image 256 px prepared dataset."""
    import torch

    from bench.common import build_model_folder, prepare, write_images
    from pixart_tune.base import INTERPOLATION_SCALE
    from pixart_tune.models import XL2_TRANSFORMER_CONFIG

    config = transformer_config or dict(XL2_TRANSFORMER_CONFIG, sample_size=32, interpolation_scale=INTERPOLATION_SCALE[256])
    model = build_model_folder(work / "model", config, caption_channels=caption_channels, dtype=dtype or torch.bfloat16)
    source = write_images(work / "images", 2, (256, 256))
    return model, prepare(model, source, work / "prepared")


def text_encoder_evidence(transformer) -> dict[str, object]:
    """What says whether a text encoder is in this process, besides ``transformer``.

    The T5 modelling module imported or not; T5 module objects alive; and the
    elements of every parameter and buffer held by any live ``nn.Module`` that is
    not ``transformer`` (with its LoRA) — a text encoder cannot hide from that.
    """
    import gc

    import torch

    gc.collect()
    modules = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    storages: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.numel()
    own = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), *transformer.buffers()]}
    return {
        "t5_module_imported": T5_MODULE in sys.modules,
        "t5_objects": sorted({type(m).__name__ for m in modules if type(m).__name__.startswith("T5")}),
        "resident_tensor_elements": sum(storages.values()),
        "foreign_tensor_elements": sum(n for ptr, n in storages.items() if ptr not in own),
    }


def no_text_encoder(evidence: dict) -> bool:
    return not evidence["t5_module_imported"] and not evidence["t5_objects"] and evidence["foreign_tensor_elements"] == 0


# --- the measured subprocess -------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """One configuration: Trainer setup + ``--steps`` steps; prints a JSON line."""
    from bench.common import peak_rss_gib, rss_gib

    result: dict[str, object] = {"rss_imports_gib": rss_gib()}
    # Everything the step imports, imported first, to tell the libraries' RSS apart.
    import bitsandbytes  # noqa: F401
    from diffusers import DDPMScheduler, PixArtTransformer2DModel  # noqa: F401

    from pixart_tune.training.config import load_train_config
    from pixart_tune.training.trainer import Trainer

    result["rss_libraries_gib"] = rss_gib()
    config = load_train_config(RECIPE, overrides(args.model, args.data, args.out, args.checkpointing, args.batch_size))
    start = time.perf_counter()
    trainer = Trainer(config, progress=False)
    trainer.setup()
    result["setup_s"] = time.perf_counter() - start
    result["rss_after_setup_gib"] = rss_gib()
    result["optimizer"] = type(trainer.optimizer.optimizer).__module__ + "." + type(trainer.optimizer.optimizer).__name__
    times, losses = [], []
    for _ in range(args.steps):
        batch = trainer.next_batch()
        start = time.perf_counter()
        losses.append(trainer.train_step(batch).item())
        times.append(time.perf_counter() - start)
    result["step_s"] = times
    result["loss"] = losses
    result["peak_rss_gib"] = peak_rss_gib()

    # Proof that no text encoder is in this process.
    transformer = trainer.transformer
    result.update(text_encoder_evidence(transformer))
    result["transformer_parameters"] = sum(p.numel() for p in transformer.parameters())
    result["lora_parameters"] = sum(p.numel() for p in trainer.params)
    result["text_encoder_on_disk"] = (Path(args.model) / "text_encoder").is_dir()
    trainer.cleanup()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(model: Path, data: Path, out: Path, checkpointing: bool, batch_size: int, steps: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model), "--data", str(data),
        "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size),
    ] + (["--checkpointing"] if checkpointing else [])
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"the measured run failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- the report --------------------------------------------------------------------


def plan_rows(model: Path, data: Path, out: Path, checkpointing: bool, batch_size: int):
    from pixart_tune.training.config import load_train_config
    from pixart_tune.training.memory import plan_memory

    config = load_train_config(RECIPE, overrides(model, data, out, checkpointing, batch_size))
    return plan_memory(config, 256)


def cpu_equivalent(plan, libraries_gib: float) -> float:
    """The plan as a CPU process's RSS: no CUDA context, plus the host memory of the libraries."""
    from pixart_tune.training.memory import CONTEXT_RESERVE_GIB

    return plan.total_gib - CONTEXT_RESERVE_GIB + libraries_gib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the model folder and dataset here (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (default 3)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--modes", default="off,on", help="gradient checkpointing modes to run: off, on or off,on")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from bench.common import Timing, git_commit, load_average, machine, table

    modes = [m.strip() == "on" for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_realsize_") as tmp:
        work = args.workdir or Path(tmp)
        if not (work / "prepared" / "dataset.json").is_file():
            print("building the XL-2 model folder (random bf16) and preparing two images ...", flush=True)
            start = time.perf_counter()
            build(work)
            print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
        model, data = work / "model", work / "prepared"
        results = []
        for checkpointing in modes:
            label = f"gradient checkpointing {'on' if checkpointing else 'off'}"
            print(f"training {args.steps} steps in a subprocess, {label} ...", flush=True)
            out = Path(tempfile.mkdtemp(prefix="run_", dir=work))
            load = load_average()
            measured = run_child(model, data, out, checkpointing, args.batch_size, args.steps)
            measured["load"] = f"{load} before, {load_average()} after"
            results.append((label, measured, plan_rows(model, data, out, checkpointing, args.batch_size)))

    rows, proof = [], []
    for label, m, plan in results:
        steps = Timing(label, m["step_s"][1:] or m["step_s"])  # the first step also allocates
        lo, hi = steps.spread
        cpu_estimate = cpu_equivalent(plan, m["rss_libraries_gib"])
        rows.append([
            label, f"{m['peak_rss_gib']:.2f}", f"{m['rss_libraries_gib']:.2f}", f"{m['rss_after_setup_gib']:.2f}",
            f"{plan.total_gib:.2f}", f"{cpu_estimate:.2f} ({(cpu_estimate - m['peak_rss_gib']) / m['peak_rss_gib'] * 100:+.0f}%)",
            f"{m['setup_s']:.0f}", f"{m['step_s'][0]:.1f}", f"{steps.median:.2f} ({lo:.2f} - {hi:.2f})",
        ])
        clean = no_text_encoder(m)
        proof.append(
            f"- {label}: `{T5_MODULE}` imported: {m['t5_module_imported']}; T5 module objects: {m['t5_objects'] or 'none'}; "
            f"tensor elements resident in nn.Modules: {m['resident_tensor_elements']:,} = transformer "
            f"{m['transformer_parameters'] - m['lora_parameters']:,} + LoRA {m['lora_parameters']:,} + buffers; outside the "
            f"transformer: {m['foreign_tensor_elements']:,} (text_encoder/ present in the model folder: {m['text_encoder_on_disk']}) "
            f"-> {'no text encoder loaded' if clean else 'A TEXT ENCODER WAS LOADED'}; optimizer {m['optimizer']}; {m['load']}"
        )
    print()
    print(f"real-size XL-2 LoRA step on the CPU: 256 px, batch {args.batch_size}, rank-16 attention LoRA, bf16 base, "
          f"recipe {RECIPE.name}; {args.steps} steps per run, each run in its own process")
    print(f"machine: {machine()}; commit {git_commit()}; {time.strftime('%Y-%m-%d')}")
    print()
    print(table(["run", "peak RSS GiB", "RSS of libraries GiB", "RSS after setup GiB", "plan (GPU) GiB",
                 "plan as CPU RSS GiB (vs peak)", "setup s", "1st step s", "later steps s, median (p10 - p90)"], rows))
    print()
    print("plan as CPU RSS = plan - its CUDA context row + the process's RSS after importing torch, diffusers, peft, "
          "accelerate and bitsandbytes (the libraries' code and data, which a GPU process keeps in host memory, not in "
          "VRAM). RSS after setup is low because the weights are memory-mapped from safetensors and count once the first "
          "step reads them.")
    print()
    print("\n".join(proof))
    print()
    for label, _, plan in results:
        print(f"`pixart-tune plan` ({label}):")
        print("\n".join("    " + line for line in plan.table().splitlines()))
    label, m, plan = results[0]
    clean = all(no_text_encoder(r[1]) for r in results)
    print()
    print(f"realsize_memory: peak RSS {m['peak_rss_gib']:.2f} GiB ({label}; plan predicts {plan.total_gib:.2f} GiB of GPU memory), "
          f"{'no text encoder loaded' if clean else 'A TEXT ENCODER WAS LOADED'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
