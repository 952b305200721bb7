"""What a finished run leaves in its output_dir, told in a few lines."""

from __future__ import annotations

from pathlib import Path

from pixart_tune.base import SAMPLES
from pixart_tune.training import checkpoint as ckpt


def describe_outputs(output_dir: Path, adapter: Path) -> list[str]:
    """What a finished run left in ``output_dir``, one line a kind, for the end of ``train``."""
    lines = [f"trained; the run's files are in {output_dir}/:", f"  {adapter.relative_to(output_dir)}/  the LoRA (sample, merge or export it)"]
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
