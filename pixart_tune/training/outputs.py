"""What a finished run leaves in its output_dir, told in a few lines."""

from __future__ import annotations

from pathlib import Path

from pixart_tune.adapters.export import export_file
from pixart_tune.adapters.loader import read_lora
from pixart_tune.base import ADAPTER_DIR, SAMPLES
from pixart_tune.errors import UserError
from pixart_tune.training import checkpoint as ckpt
from pixart_tune.training import plots

RAW_ADAPTER_DIR = "adapter_raw"
"""Beside adapter/ of a run with an EMA: the weights as trained, before averaging."""
COMFYUI_FILE = "adapter_comfyui.safetensors"
"""Beside the adapter folder of a LoKr / LoHa run: the adapter in the layout ComfyUI core's LoRA loaders read."""


def write_comfyui_file(adapter: Path) -> Path:
    """Writes :data:`COMFYUI_FILE` beside ``adapter`` (a LoKr / LoHa run's PEFT folder, which ComfyUI does not read)."""
    return export_file(read_lora(adapter), "comfyui", adapter.parent / COMFYUI_FILE)


def check_output_dir(out: Path, resuming: bool) -> None:
    """Refuses an output_dir that holds a run (unless resuming it) or anything else, before anything loads."""
    if not resuming and ckpt.list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints of a run; continue it with --resume latest, or choose another output_dir")
    if not resuming and (out / ADAPTER_DIR).exists():
        # A finished run saved without checkpoints: training again would overwrite its adapter.
        raise UserError(
            f"{out} already holds a finished run's {ADAPTER_DIR}/; choose another output_dir, or move it away "
            f"(to continue from it, set init_adapter={out / ADAPTER_DIR} with a new output_dir)"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; choose a folder")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() and not resuming else []
    if found:
        # A new run writes config.yaml, logs/, samples/ ... here: never over what someone else put there.
        raise UserError(
            f"output_dir {out} is not empty ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); a new run needs "
            "an empty or new folder: choose another output_dir (or move those files away)"
        )


def describe_outputs(output_dir: Path, adapter: Path) -> list[str]:
    """What a finished run left in ``output_dir``, one line a kind, for the end of ``train``."""
    lines = [f"trained; the run's files are in {output_dir}/:", f"  {adapter.relative_to(output_dir)}/  the LoRA (sample, merge or export it)"]
    if (output_dir / RAW_ADAPTER_DIR).is_dir():
        lines[-1] = f"  {adapter.relative_to(output_dir)}/  the LoRA, its EMA weights (sample, merge or export it)"
        lines.append(f"  {RAW_ADAPTER_DIR}/  the same LoRA without the EMA")
    if (output_dir / COMFYUI_FILE).is_file():
        lines.append(f"  {COMFYUI_FILE}  the same adapter for ComfyUI's own LoRA loaders")
    grids = sorted(p.name for p in (output_dir / SAMPLES).glob("*.png"))
    if grids:
        lines.append(f"  samples/  validation grids: {', '.join(grids)}")
    for picture in sorted(output_dir.glob("*.png")):
        lines.append(f"  {picture.name}")
    best = plots.lowest_eval(plots.LossHistory.load(output_dir, ckpt.MAX_STEP))
    if best is not None:
        step, value, rise = best
        lines.append(
            f"  held-out loss lowest at step {step} ({value:.4f})"
            + (f", {rise:.0%} higher at the end: over-fitting after it (see loss.png; a checkpoint near step {step} may be the better adapter)" if rise > plots.OVERFIT_RISE else "")
        )
    kept = ckpt.list_checkpoints(output_dir)
    if kept:
        lines.append(f"  checkpoints/  {', '.join(p.name for p in kept)} (continue with --resume latest)")
    if (output_dir / "logs").is_dir():
        lines.append(f"  logs/  TensorBoard (tensorboard --logdir {output_dir / 'logs'})")
    if (output_dir / "wandb").is_dir():
        # An online run is on its page already; only an offline one has to be uploaded.
        offline = any((output_dir / "wandb").glob("offline-run-*"))
        lines.append("  wandb/  Weights & Biases run files" + (f" (an offline run: wandb sync {output_dir / 'wandb'}/offline-run-*)" if offline else ""))
    return lines
