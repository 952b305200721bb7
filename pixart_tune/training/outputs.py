"""What a finished run leaves in its output_dir, told in a few lines."""

from __future__ import annotations

from pathlib import Path

from pixart_tune.adapters.export import export_file
from pixart_tune.adapters.loader import read_lora
from pixart_tune.base import SAMPLES
from pixart_tune.training import checkpoint as ckpt

COMFYUI_FILE = "adapter_comfyui.safetensors"
"""Beside the adapter folder of a LoKr / LoHa run: the adapter in the layout ComfyUI core's LoRA loaders read."""


def write_comfyui_file(adapter: Path) -> Path:
    """Writes :data:`COMFYUI_FILE` beside ``adapter`` (a LoKr / LoHa run's PEFT folder, which ComfyUI does not read)."""
    return export_file(read_lora(adapter), "comfyui", adapter.parent / COMFYUI_FILE)


def describe_outputs(output_dir: Path, adapter: Path) -> list[str]:
    """What a finished run left in ``output_dir``, one line a kind, for the end of ``train``."""
    lines = [f"trained; the run's files are in {output_dir}/:", f"  {adapter.relative_to(output_dir)}/  the LoRA (sample, merge or export it)"]
    if (output_dir / COMFYUI_FILE).is_file():
        lines.append(f"  {COMFYUI_FILE}  the same adapter for ComfyUI's own LoRA loaders")
    grids = sorted(p.name for p in (output_dir / SAMPLES).glob("*.png"))
    if grids:
        lines.append(f"  samples/  validation grids: {', '.join(grids)}")
    for picture in sorted(output_dir.glob("*.png")):
        lines.append(f"  {picture.name}")
    kept = ckpt.list_checkpoints(output_dir)
    if kept:
        lines.append(f"  checkpoints/  {', '.join(p.name for p in kept)} (continue with --resume latest)")
    if (output_dir / "logs").is_dir():
        lines.append(f"  logs/  TensorBoard (tensorboard --logdir {output_dir / 'logs'})")
    return lines
