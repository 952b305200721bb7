"""The app's prompt grid: several prompts x seeds for the base model and adapters, in one PNG.

The ``sample`` verb's comparison, drawn through the app's loaded model: the same
rows (:func:`~pixart_tune.sampling.comparison_rows`: the base model, each adapter
alone if asked, all adapters together), the same images
(:func:`~pixart_tune.sampling.draw_comparison`) and the same grid
(:func:`~pixart_tune.sampling.comparison_grid`), one grid per prompt stacked under
a readable heading with the whole prompt, so a long list stays legible. The PNG
carries every parameter in its text chunks, written by ``save_png`` as ``sample``
writes its images.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from pixart_tune.app.service import MAX_SEED, PreviewApp, parse_bucket, square_bucket
from pixart_tune.errors import UserError

MAX_PROMPTS = 16
MAX_SEEDS = 8
MAX_IMAGES = 64
"""The most images one grid may hold (rows x prompts x seeds): a 1024 px model draws for minutes per dozen."""
GRIDS_FOLDER = "grids"
"""Under the outputs folder: where the grids are written."""

Progress = Callable[..., object]


def _silent(*args, **kwargs) -> None:
    return None


@dataclasses.dataclass
class Grid:
    image: Image.Image
    path: Path
    """The PNG in the outputs folder, with ``parameters`` in its text chunks."""
    parameters: dict


def parse_prompts(text: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped (as in ``sample --prompts-file``)."""
    prompts = [line.strip() for line in str(text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError("write at least one prompt, one a line")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} in one grid; split the list")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """``"0, 1, 2"`` -> [0, 1, 2]: whole numbers from 0 to MAX_SEED (the Generate tab's range), at most MAX_SEEDS."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    if not parts:
        raise UserError("give at least one seed, e.g. 0, 1")
    bad = [p for p in parts if not p.isascii() or not p.isdigit() or int(p) > MAX_SEED]
    if bad:
        raise UserError(f"seed {bad[0][:30]!r}: seeds are whole numbers from 0 to {MAX_SEED}, separated by commas")
    if len(parts) > MAX_SEEDS:
        raise UserError(f"{len(parts)} seeds: at most {MAX_SEEDS} in one grid")
    return [int(p) for p in parts]


def check_steps(steps, guidance) -> tuple[int, float]:
    """Steps as a whole number and guidance as a finite one; the sampler checks their ranges."""
    try:
        steps_f, guidance = float(steps), float(guidance)
    except (TypeError, ValueError):
        raise UserError(f"steps {steps!r} and guidance {guidance!r} must be numbers") from None
    if not math.isfinite(steps_f) or steps_f != int(steps_f):
        raise UserError(f"steps must be a whole number, got {steps}")
    from pixart_tune.sampling import check_numbers

    check_numbers(int(steps_f), guidance)
    return int(steps_f), guidance


def prompt_grid(
    app: PreviewApp,
    model: str,
    prompts: str,
    seeds: str,
    paths: Sequence[str],
    scales: Sequence[float],
    *,
    negative: str = "",
    steps=20,
    guidance=4.5,
    bucket: str | None = None,
    base: bool = True,
    each_alone: bool = False,
    progress: Progress = _silent,
) -> Grid:
    """Draws the grid of ``prompts`` (one a line) x ``seeds`` for the base model and the adapters, writes its PNG.

    ``bucket`` is ``HxW`` (the model's square bucket when empty). Everything is
    checked before the model is touched; ``progress(fraction, desc=...)`` after
    each denoising step.
    """
    from pixart_tune.sampling import comparison_rows, draw_comparison

    prompt_list, seed_list = parse_prompts(prompts), parse_seeds(seeds)
    steps, guidance = check_steps(steps, guidance)
    if any(not math.isfinite(float(s)) for s in scales):
        raise UserError("adapter scales must be finite numbers")
    specs = app.specs(list(paths or []), list(scales or []))  # the path guard: adapters only from the allowed folders
    rows = comparison_rows(specs, None, base=bool(base), separately=bool(each_alone))
    if not rows:
        raise UserError("nothing to draw: include the base model or pick adapters")
    total = len(rows) * len(prompt_list) * len(seed_list)
    if total > MAX_IMAGES:
        raise UserError(
            f"{total} images ({len(rows)} rows x {len(prompt_list)} prompts x {len(seed_list)} seeds): at most {MAX_IMAGES} "
            "in one grid; use fewer prompts, seeds or adapter rows"
        )
    labels = [row_label(app, row_specs) for _, row_specs in rows]
    columns = [(p, s) for p in prompt_list for s in seed_list]
    per_image = 1 / total

    def on_step(image: int, step: int, of: int) -> None:
        row, column = divmod(image, len(columns))
        prompt, seed = divmod(column, len(seed_list))
        progress(
            (image + step / of) * per_image,
            desc=f"{labels[row]}: prompt {prompt + 1}/{len(prompt_list)}, seed {seed_list[seed]}: step {step}/{of}",
        )

    with app.holder.lock:  # one model in memory, one generation at a time
        progress(0.0, desc="loading the base model")
        checked = app.check_model(model)
        sampler = app.holder.get(checked)
        height, width = parse_bucket(bucket or square_bucket(sampler.buckets()))
        sampler.check_size(height, width)
        drawn = draw_comparison(
            sampler, rows, columns, negative_prompt=str(negative or ""), steps=steps, guidance=guidance,
            height=height, width=width, on_step=on_step,
        )
        image = layout(drawn, labels, prompt_list, seed_list)
        parameters = {
            "prompts": prompt_list, "negative_prompt": str(negative or ""), "seeds": seed_list, "steps": steps,
            "guidance": guidance, "height": height, "width": width, "model": checked,
            "adapters": [{"path": s.path, "scale": s.scale} for s in specs], "rows": labels,
        }
        path = _write(app.settings.outputs / GRIDS_FOLDER, image, parameters)
    progress(1.0, desc="done")
    return Grid(image, path, parameters)


def row_label(app: PreviewApp, specs) -> str:
    """"base", or the row's adapters as the menus show them (without the root folder's name) with their scales."""
    if not specs:
        return "base"
    return " + ".join(f"{app.label(s.path).split('/', 1)[-1]} x{s.scale:g}" for s in specs)


def layout(drawn: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], prompts: Sequence[str], seeds: Sequence[int]) -> Image.Image:
    """One ``sample`` grid per prompt (rows x seeds), each under a heading with the whole prompt, stacked."""
    from pixart_tune.sampling import comparison_grid

    count = len(seeds)
    blocks = []
    for k, prompt in enumerate(prompts):
        block, _ = comparison_grid([row[k * count : (k + 1) * count] for row in drawn], row_labels, [(prompt, s) for s in seeds])
        blocks.append((_heading(f"{k + 1}/{len(prompts)}: {prompt}", block.width, drawn[0][0].width), block))
    # A white band on top, so that the viewer's badge in the corner (the image's label on the page) covers no heading.
    y = max(40, 2 * _font_size(drawn[0][0].width))
    grid = Image.new("RGB", (blocks[0][1].width, y + sum(h.height + b.height for h, b in blocks)), "white")
    for heading, block in blocks:
        grid.paste(heading, (0, y))
        grid.paste(block, (0, y + heading.height))
        y += heading.height + block.height
    return grid


def _heading(text: str, width: int, tile: int, max_lines: int = 3) -> Image.Image:
    """``text`` wrapped to ``width`` in a font sized to the tiles (readable when the grid is shown scaled down)."""
    from PIL import ImageDraw, ImageFont

    size = _font_size(tile)
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width - 16:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:  # the whole prompt is in the PNG's parameters
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    line_height = size + size // 3
    heading = Image.new("RGB", (width, size // 2 + line_height * len(lines) + size // 3), "white")
    draw = ImageDraw.Draw(heading)
    for i, line in enumerate(lines):
        draw.text((8, size // 2 + i * line_height), line, fill="black", font=font)
    return heading


def _font_size(tile: int) -> int:
    return max(14, tile // 14)


def _write(folder: Path, image: Image.Image, parameters: dict) -> Path:
    """``folder/grid-YYYYMMDD-HHMMSS[-N].png``: a new name, never an existing file (called under the model lock)."""
    from pixart_tune.generation import save_png

    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"grid-{stamp}.png", 1
    while path.exists() or path.is_symlink():
        n += 1
        path = folder / f"grid-{stamp}-{n}.png"
    return save_png(image, path, parameters)
