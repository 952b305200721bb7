"""Sampling with adapters: the ``sample`` verb's comparison grids and the app's previews.

``Sampler`` keeps one pipeline loaded and applies any number of adapters (any
layout the loader reads, each at its own scale) between generations, through the
diffusers-style LoRA methods of :mod:`pixart_tune.adapters.pipeline_lora` (a file's
T5 part goes into the text encoder), drawing through :func:`pixart_tune.generation.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from pixart_tune.adapters.layouts import LoraWeights
from pixart_tune.adapters.loader import AdapterSpec, parse_spec, read_lora
from pixart_tune.adapters.pipeline_lora import enable_lora
from pixart_tune.base import bucket_table, dtype_for, resolution_of
from pixart_tune.errors import UserError
from pixart_tune.fsutil import refuse_unsafe_outputs
from pixart_tune.generation import generate, image_grid, save_png
from pixart_tune.models import default_device, load_pipeline, quiet_loading
from pixart_tune.parts import use_components

__all__ = ["AdapterSpec", "SampleConfig", "Sampler", "sample"]

logger = logging.getLogger(__name__)

MAX_STEPS = 1000
"""The most denoising steps: the schedulers' training timesteps."""
SIZE_FACTOR = 4
"""A size may have up to this many times the pixels of the model's largest bucket (and twice its longest side)."""
MAX_PIXELS = SIZE_FACTOR * 2048 * 2048
"""Any model's cap, checked before one loads: the largest bucket of the largest PixArt-Sigma (2K) times SIZE_FACTOR."""


# --- the adapter-aware sampler ----------------------------------------------------------

class Sampler:
    """One loaded ``PixArtSigmaPipeline`` and the adapters applied to it.

    Each adapter file is read and injected once (keyed by path, modification time
    and size, so an adapter rewritten by a running training is picked up again);
    ``generate`` then only switches which adapters are active and at what scale.
    Calls are serialised by a lock, since adapters live inside the one model.
    """

    def __init__(self, model: str, device: str | None = None, dtype: str = "auto", allow_pickle: bool = False):
        self.model = str(model)
        self.device = torch.device(device) if device else default_device()
        self.dtype = dtype_for(dtype, self.device)
        self.allow_pickle = allow_pickle
        quiet_loading()  # the sampler's callers show their own progress, not the libraries' loading bars
        try:
            # diffusers' LoRA methods (pixart_tune.adapters.pipeline_lora): a file's T5 part follows its transformer part.
            self.pipe = enable_lora(load_pipeline(self.model, self.dtype).to(self.device))
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load a PixArt-Sigma pipeline from {self.model!r}: {error}. Give a pipeline folder in the "
                "diffusers layout (pixart-tune init-tiny makes a tiny one), or a hub id with the network reachable"
            ) from error
        self._loaded: dict[str, tuple[tuple[int, int], str]] = {}
        self._counter = 0
        self.lock = threading.RLock()

    @property
    def transformer(self):
        return self.pipe.transformer

    def buckets(self) -> list[tuple[int, int]]:
        """(height, width) of every aspect-ratio bucket of this model's resolution, by aspect."""
        table = bucket_table(self.resolution)
        return [(int(h), int(w)) for _, (h, w) in sorted(table.items(), key=lambda item: float(item[0]))]

    @property
    def resolution(self) -> int:
        return resolution_of(self.transformer.config.sample_size)

    def default_size(self) -> tuple[int, int]:
        return self.resolution, self.resolution

    def adapter_name(self, spec: AdapterSpec) -> str:
        """Injects the adapter at ``spec.path`` once; returns its adapter name in the model."""
        path = str(Path(spec.path).resolve())
        if not Path(path).exists():
            raise UserError(f"adapter {spec.path} does not exist; pass an adapter folder or a .safetensors file")
        cached = self._loaded.get(path)
        if cached and cached[0] == _stat(Path(path)):
            return cached[1]
        return self.add_adapter(spec.path, read_lora(path, self.allow_pickle))

    def add_adapter(self, path: str | Path, weights: LoraWeights) -> str:
        """Injects ``weights``, read from ``path``, replacing what was injected from there; returns its name."""
        source = str(path)
        path = str(Path(path).resolve())
        stat = _stat(Path(path))
        cached = self._loaded.get(path)
        if cached:
            with warnings.catch_warnings():
                # PEFT warns when the removed adapter was active; activate() sets them right after.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.pipe.delete_adapters(cached[1])
        self._counter += 1
        name = f"adapter_{self._counter}"
        self.pipe.load_lora_weights(weights, adapter_name=name, source=source)
        self._loaded[path] = (stat, name)
        return name

    def activate(self, adapters: Sequence[AdapterSpec]) -> None:
        """Makes exactly ``adapters`` active at their scales (none: the base model)."""
        scales: dict[str, float] = {}
        for spec in adapters:
            name = self.adapter_name(spec)
            # The same file twice adds up, as two copies of it would.
            scales[name] = scales.get(name, 0.0) + spec.scale
        # Scale 0 means off: not "scaled to nothing", which a DoRA adapter is not (its
        # magnitude still rescales the weights at scaling 0).
        scales = {name: scale for name, scale in scales.items() if scale != 0}
        self.pipe.set_adapters(list(scales), list(scales.values()))

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        adapters: Sequence[AdapterSpec] = (),
        *,
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float = 4.5,
        height: int | None = None,
        width: int | None = None,
        show_progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Images for ``prompts[i]`` with ``seeds[i]`` under exactly ``adapters``; ``on_step(done, steps)`` after each denoising step."""
        if len(prompts) != len(seeds):
            raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        check_numbers(steps, guidance)
        default_h, default_w = self.default_size()
        height, width = int(height or default_h), int(width or default_w)
        self.check_size(height, width)
        with self.lock:
            self.activate(adapters)
            return generate(
                self.pipe, list(prompts), list(seeds), height=height, width=width, steps=steps,
                guidance=guidance, negative_prompt=negative_prompt, show_progress=show_progress, on_step=on_step,
            )


    def check_size(self, height: int, width: int) -> None:
        """Refuses a size that is no multiple of the patch grid, or beyond this model's largest bucket (module docstring)."""
        multiple = 8 * int(self.transformer.config.patch_size)
        if height < 1 or width < 1 or height % multiple or width % multiple:
            raise UserError(f"size {height}x{width} must be a multiple of {multiple}; pick one of the buckets")
        pixels = max(h * w for h, w in self.buckets())
        side = max(max(hw) for hw in self.buckets())
        if height * width > SIZE_FACTOR * pixels or max(height, width) > 2 * side:
            raise UserError(
                f"size {height}x{width} is beyond what this {self.resolution} px model draws (at most {SIZE_FACTOR}x the "
                f"pixels of its largest bucket, {SIZE_FACTOR * pixels} px, and sides up to {2 * side}); pick one of the buckets"
            )


def check_numbers(steps: int, guidance: float) -> None:
    """Refuses step counts and guidance scales that mean nothing (NaN, infinite, out of range)."""
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps must be 1 to {MAX_STEPS}, got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"guidance must be a finite number of at least 0 (4.5 is usual), got {guidance}")


def check_shape(aspect: float | None, size: str | None) -> None:
    """Refuses an aspect that is not a positive number and a size beyond any PixArt-Sigma model."""
    if aspect is not None and not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a positive number (height / width), got {aspect}")
    if size is not None:
        height, width = parse_size(size)
        if height * width > MAX_PIXELS:
            raise ValueError(f"size {size} has {height * width} pixels, beyond any PixArt-Sigma model (at most {MAX_PIXELS}); pick one of the buckets")


def _stat(path: Path) -> tuple[int, int]:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        return max((p.stat().st_mtime_ns for p in files), default=0), sum(p.stat().st_size for p in files)
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


# --- the ``sample`` verb: a comparison grid ---------------------------------------------


@dataclasses.dataclass
class SampleConfig:
    """What ``pixart-tune sample`` draws: every row (base, adapters) x every prompt and seed."""

    model: str
    """Base model: a diffusers PixArt folder or hub id (or a transformer alone, with ``components``)."""
    components: str | None = None
    """Where the VAE, T5, tokenizer and scheduler come from when the model is a transformer
    alone: a pipeline folder or hub id (default: the model's own, else its family's)."""
    prompts: list[str] = dataclasses.field(default_factory=list)
    """Prompts; every prompt is drawn with every seed."""
    prompts_file: str | None = None
    """A text file with one prompt per line (lines starting with # are skipped), added to the prompts."""
    negative_prompt: str = ""
    """What the images should not show."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds; every prompt is drawn with every seed."""
    steps: int = 20
    """Denoising steps per image."""
    guidance: float = 4.5
    """Classifier-free guidance scale."""
    aspect: float | None = None
    """Height / width; the nearest aspect bucket of the model is used (default: 1.0, square)."""
    size: str | None = None
    """HEIGHTxWIDTH used as given instead of a bucket."""
    adapters: list[str] = dataclasses.field(default_factory=list)
    """Adapter folders or .safetensors files in any supported layout, each PATH or PATH:SCALE."""
    sweep: list[float] | None = None
    """Scales of the first adapter, one grid row each (e.g. 0, 0.5, 1)."""
    base: bool = True
    """Draw a row with the base model (no adapter)."""
    separately: bool = False
    """Also a row for each adapter alone."""
    out: str = "samples"
    """Output folder for the PNGs and grid.png."""
    overwrite: bool = False
    """Replace PNGs of the same names (grid.png, the numbered images) in the output folder; other files stay."""
    device: str | None = None
    """Torch device (default: cuda when available, else cpu)."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16."""
    allow_pickle_runs_code: bool = False
    """Also read .bin/.pt/.ckpt adapters; unpickling can run any code in the file."""

    def __post_init__(self) -> None:
        check_numbers(self.steps, self.guidance)
        if not self.seeds or any(not 0 <= seed < 2**64 for seed in self.seeds):
            raise ValueError(f"seeds must be whole numbers from 0 to 2**64 - 1, got {self.seeds}")
        check_shape(self.aspect, self.size)
        if any(not math.isfinite(scale) for scale in self.sweep or []):
            raise ValueError(f"sweep scales must be finite numbers, got {self.sweep}")


@dataclasses.dataclass
class SampleResult:
    images: list[Path]
    """One PNG per (row, prompt, seed), with its parameters in the PNG."""
    grid: Path
    """The comparison grid: one row per variant, one column per (prompt, seed)."""


def sample(config: SampleConfig, on_image: Callable[[int, int], None] | None = None) -> SampleResult:
    """Draws the comparison of ``config`` into ``config.out``; ``on_image(done, total)`` after each image.

    Every adapter is read (and a bad one refused) before the model loads, and read once.
    """
    use_components(config.model, config.components)
    prompts = read_prompts(config.prompts, config.prompts_file)
    specs = [parse_spec(text) for text in config.adapters]
    rows = comparison_rows(specs, config.sweep, base=config.base, separately=config.separately)
    if not rows:
        raise UserError("nothing to draw: --no-base needs at least one --adapter")
    columns = [(p, s) for p in prompts for s in config.seeds]
    out = Path(config.out)
    names = [out / f"{row:02d}_{col:03d}_seed{seed}.png" for row in range(len(rows)) for col, (_, seed) in enumerate(columns)]
    refuse_unsafe_outputs([out], kind="folder", overwrite=True)  # the folder may exist and hold other files
    inputs = [(spec.path, "an input adapter") for spec in specs] + ([(config.prompts_file, "the prompts file")] if config.prompts_file else [])
    refuse_unsafe_outputs([*names, out / "grid.png"], inputs, overwrite=config.overwrite)
    weights = {spec.path: read_lora(spec.path, config.allow_pickle_runs_code) for spec in specs}
    sampler = Sampler(config.model, device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle_runs_code)
    for path, adapter in weights.items():
        sampler.add_adapter(path, adapter)
    height, width = bucket_size(sampler, config.aspect, config.size)
    sampler.check_size(height, width)
    drawn = draw_comparison(
        sampler, rows, columns, negative_prompt=config.negative_prompt, steps=config.steps, guidance=config.guidance,
        height=height, width=width, on_image=on_image,
    )
    images, files = [], []
    for row, ((_, adapters), row_images) in enumerate(zip(rows, drawn)):
        for col, ((prompt, seed), image) in enumerate(zip(columns, row_images)):
            parameters = {
                "prompt": prompt, "negative_prompt": config.negative_prompt, "seed": seed, "steps": config.steps,
                "guidance": config.guidance, "height": height, "width": width, "model": config.model,
                "adapters": [{"path": s.path, "scale": s.scale} for s in adapters],
            }
            files.append(save_png(image, names[row * len(columns) + col], parameters))
            images.append(image)
    grid, labels = comparison_grid(drawn, [label for label, _ in rows], columns)
    grid_path = save_png(grid, out / "grid.png", {"rows": [label for label, _ in rows], "columns": labels, "model": config.model})
    return SampleResult(files, grid_path)


def draw_comparison(
    sampler: Sampler,
    rows: Sequence[tuple[str, Sequence[AdapterSpec]]],
    columns: Sequence[tuple[str, int]],
    *,
    negative_prompt: str = "",
    steps: int = 20,
    guidance: float = 4.5,
    height: int | None = None,
    width: int | None = None,
    on_image: Callable[[int, int], None] | None = None,
    show_progress: bool = False,
    on_step: Callable[[int, int, int], None] | None = None,
) -> list[list[Image.Image]]:
    """The image of every row (label, adapters) x column (prompt, seed), one list per row.

    The same seed in every row starts from the same noise, so rows differ by their
    adapters alone. ``on_image(done, total)`` after each image; ``show_progress``:
    the pipeline's own bar over the denoising steps; ``on_step(image, step, steps)``
    after each denoising step of the image numbered ``image`` (from 0).
    """
    total = len(rows) * len(columns)
    drawn: list[list[Image.Image]] = []
    for _, adapters in rows:
        drawn.append([])
        for prompt, seed in columns:
            drawn[-1] += sampler.generate(
                [prompt], [seed], adapters, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height, width=width,
                show_progress=show_progress,
                on_step=None if on_step is None else functools.partial(on_step, sum(map(len, drawn))),
            )
            if on_image is not None:
                on_image(sum(map(len, drawn)), total)
    return drawn


def tile_grid(images: Sequence[Image.Image], labels: Sequence[str], max_cols: int = 4, top: int = 40) -> Image.Image:
    """Images in rows of at most ``max_cols``, each under its own label in a font sized to the tile.

    ``top`` pads the grid above the first row, so a viewer's badge in the corner
    (the app's image label) covers no label.
    """
    from PIL import ImageDraw, ImageFont

    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    cols = min(max_cols, len(images))
    rows = -(-len(images) // cols)
    size = max(14, w // 14)
    band = size + size // 2
    grid = Image.new("RGB", (cols * w, top + rows * (band + h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=size)
    for index, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(index, cols)
        y = top + r * (band + h)
        draw.text((c * w + 6, y + size // 4), label, fill="black", font=font)
        grid.paste(image.convert("RGB").resize((w, h)), (c * w, y + band))
    return grid


def comparison_grid(
    drawn: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], columns: Sequence[tuple[str, int]]
) -> tuple[Image.Image, list[str]]:
    """The ``sample`` verb's grid of :func:`draw_comparison`'s images, and its column labels.

    One row per variant (labelled on the left), one column per (prompt, seed),
    labelled with the prompt's first 24 characters and the seed. The app's prompt
    grid draws one of these per prompt.
    """
    labels = [f"{p[:24]} #{s}" for p, s in columns]
    images = [image for row in drawn for image in row]
    return image_grid(images, cols=len(columns), row_labels=list(row_labels), col_labels=labels), labels


def comparison_rows(specs: list[AdapterSpec], sweep: list[float] | None, base: bool, separately: bool) -> list[tuple[str, list[AdapterSpec]]]:
    """(row label, adapters) of each row of a comparison: the base, a sweep of the first adapter's scale, or the adapters."""
    rows: list[tuple[str, list[AdapterSpec]]] = []
    if base:
        rows.append(("base", []))
    if sweep is not None:
        if not specs:
            raise UserError("--sweep needs an --adapter: it varies the first adapter's scale")
        swept, rest = specs[0], specs[1:]
        for scale in sweep:
            rows.append((f"{Path(swept.path).stem} x{scale:g}", [AdapterSpec(swept.path, scale), *rest]))
        return rows
    if separately and len(specs) > 1:
        rows += [(f"{Path(s.path).stem} x{s.scale:g}", [s]) for s in specs]
    if specs:
        rows.append((" + ".join(f"{Path(s.path).stem} x{s.scale:g}" for s in specs), list(specs)))
    return rows


def bucket_size(sampler: Sampler, aspect: float | None, size: str | None) -> tuple[int, int]:
    """``size`` (HEIGHTxWIDTH) as given, else the model's bucket nearest to ``aspect`` (square by default)."""
    if size:
        return parse_size(size)
    buckets = sampler.buckets()
    ratio = 1.0 if aspect is None else aspect
    return min(buckets, key=lambda hw: abs(hw[0] / hw[1] - ratio))


def parse_size(size: str) -> tuple[int, int]:
    """(height, width) of ``HEIGHTxWIDTH``, both positive."""
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: write HEIGHTxWIDTH, e.g. 256x384") from None
    if height < 1 or width < 1:
        raise UserError(f"--size {size!r}: height and width must be positive, e.g. 256x384")
    return height, width


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """The prompts given, then those of the file, one a line."""
    prompts = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise UserError(f"prompts file {path} {what}; give a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"prompts file {path} cannot be read as UTF-8 text ({error}); save it as UTF-8") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts-file with one prompt per line")
    return prompts
