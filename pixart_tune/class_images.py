"""Class images for prior preservation: the base model's own pictures of a class.

A subject LoRA trained with prior preservation (DreamBooth's ``--class_prompt``,
kohya's regularization images) sees, beside the subject, images the base model drew
of the subject's class ("a photo of a dog"), so "a dog" keeps meaning any dog.
:func:`make_class_images` draws them into a folder: ``class_00000.png``, ... each
with ``class_00000.txt`` beside it holding the prompt (the sidecar caption that
``pixart-tune prepare`` reads) and its parameters in the PNG, as ``sample`` writes them.

Image ``i`` has seed ``seed + i``, so a set is reproducible and a run resumable:
images of the folder that were drawn with the same prompt are kept, a killed run
goes on where it stopped and a larger count adds the rest. A file of one of these
names made with another prompt (or unreadable) is refused unless ``overwrite``,
which replaces those names only, never the folder's other files. Each image lands
whole (written beside the folder, then renamed in), so a kill leaves no half PNG.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Callable

from PIL import Image

from pixart_tune.base import REAL_MODEL_ID, resolution_of
from pixart_tune.errors import UserError
from pixart_tune.fsutil import (
    files_into,
    os_error_text,
    read_regular,
    refuse_unsafe_outputs,
)
from pixart_tune.generation import save_png
from pixart_tune.hub import resolve_component
from pixart_tune.parts import use_components
from pixart_tune.sampling import Sampler, bucket_size, check_numbers, check_shape

__all__ = ["ClassImagesConfig", "ClassImagesResult", "Survey", "make_class_images", "survey"]

MAX_COUNT = 100_000
"""The most class images of one folder: their names have five digits."""
_NAME = re.compile(r"class_(\d{5})\.png")


def image_name(index: int) -> str:
    """File name of class image ``index``: ``class_00042.png``."""
    return f"class_{index:05d}.png"


def caption_name(index: int) -> str:
    """File name of the caption of class image ``index``: ``class_00042.txt``."""
    return f"class_{index:05d}.txt"


@dataclasses.dataclass
class ClassImagesConfig:
    """What ``pixart-tune class-images`` draws: ``count`` images of one prompt by the base model."""

    prompt: str
    """The class, as a caption: "a photo of a dog" (no trigger word); written beside each image as its caption."""
    out: str
    """Folder for class_00000.png ... and their .txt captions (created; other files in it stay)."""
    model: str = REAL_MODEL_ID
    """Base model the subject LoRA trains on: a diffusers PixArt folder or hub id."""
    components: str | None = None
    """Where the VAE, T5, tokenizer and scheduler come from when the model is a transformer alone."""
    count: int = 200
    """Class images the folder should hold; those already there with the same prompt count."""
    seed: int = 0
    """Seed of the first image; image i uses seed + i."""
    steps: int = 20
    """Denoising steps per image."""
    guidance: float = 4.5
    """Classifier-free guidance scale."""
    aspect: float | None = None
    """Height / width; the nearest aspect bucket of the model is used (default: 1.0, square)."""
    size: str | None = None
    """HEIGHTxWIDTH used as given instead of a bucket."""
    negative_prompt: str = ""
    """What the images should not show."""
    device: str | None = None
    """Torch device (default: cuda when available, else cpu)."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16."""
    overwrite: bool = False
    """Redraw class_NNNNN files made with another prompt (or unreadable); other files in the folder stay."""

    def __post_init__(self) -> None:
        self.prompt = self.prompt.strip()
        if not self.prompt:
            raise ValueError('the prompt is empty: give the class, e.g. "a photo of a dog"')
        if "\n" in self.prompt or "\r" in self.prompt:
            raise ValueError("the prompt must be one line: it is written as each image's .txt caption")
        if not self.out:
            raise ValueError("out is empty: give a folder for the class images")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1 to {MAX_COUNT}, got {self.count}")
        if not (0 <= self.seed and self.seed + self.count - 1 < 2**64):
            raise ValueError(f"seed must be a whole number from 0 with seed + count - 1 below 2**64, got {self.seed}")
        check_numbers(self.steps, self.guidance)
        check_shape(self.aspect, self.size)


@dataclasses.dataclass
class ClassImagesResult:
    out: Path
    """The folder."""
    images: list[Path]
    """class_00000.png ... up to the count, each with its .txt caption."""
    drawn: int
    """Images drawn by this run."""
    kept: int
    """Images that were there already, made with the same prompt."""
    beyond: int
    """class_NNNNN.png files past the count (from an earlier, larger run): prepare reads them too."""
    resolution: int
    """The model's resolution: what ``prepare --resolution`` should be given."""


@dataclasses.dataclass
class Survey:
    """What a folder holds of a set of class images, by index."""

    keep: list[int] = dataclasses.field(default_factory=list)
    """Images drawn with the prompt: kept."""
    captions: list[int] = dataclasses.field(default_factory=list)
    """Kept images whose .txt caption is missing or another prompt's (written again; the latter only with overwrite)."""
    draw: list[int] = dataclasses.field(default_factory=list)
    """Images to draw: missing, or (with overwrite) of another prompt."""
    conflicts: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    """(file, why) of each file of our names that is not of the prompt."""


def recorded_prompt(path: Path) -> str:
    """The prompt recorded in a PNG that ``save_png`` wrote; raises OSError (unreadable) or ValueError (any other file)."""
    data = read_regular(path)  # regular files only: a FIFO would block
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes it all: a cut-off PNG fails here
            text = getattr(image, "text", {}).get("pixart-tune")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # PIL raises SyntaxError for broken chunks
        raise ValueError(f"no readable image: {error}") from None
    if text is None:
        raise ValueError("no pixart-tune parameters in it")
    prompt = json.loads(text).get("prompt") if text.startswith("{") else None
    if not isinstance(prompt, str):
        raise ValueError("no prompt in its pixart-tune parameters")
    return prompt


def read_caption(path: Path) -> str:
    """The text of a caption file, stripped; raises OSError or ValueError when it cannot be read."""
    return read_regular(path).decode("utf-8-sig").strip()


def _mismatch(path: Path, prompt: str, read: Callable[[Path], str], what: str) -> str | None:
    """Why ``path`` is not of ``prompt`` (None: it is)."""
    try:
        found = read(path)
    except OSError as error:
        return f"cannot be read ({os_error_text(error)})"
    except ValueError as error:
        return f"is not a {what} of this command ({(str(error).splitlines() or [type(error).__name__])[0]})"
    if found != prompt:
        shown = found if len(found) <= 60 else found[:57] + "..."
        return f"was made with another prompt ({shown!r})"
    return None


def survey(out: Path, prompt: str, count: int) -> Survey:
    """Sorts images ``0 .. count-1`` of ``out`` into kept, to draw and conflicting; reads no model.

    A PNG of ours with its caption missing (a run killed between the two) is kept
    and its caption written again. A folder under one of our names is refused: it
    cannot be replaced by a file.
    """
    found = Survey()
    for index in range(count):
        png, txt = out / image_name(index), out / caption_name(index)
        for path in (png, txt):
            if path.is_dir():
                raise UserError(f"{path} is a folder, where class-images writes a file; move it away or choose another --out")
        png_why = _mismatch(png, prompt, recorded_prompt, "class image") if os.path.lexists(png) else "missing"
        txt_why = _mismatch(txt, prompt, read_caption, "caption") if os.path.lexists(txt) else None
        if png_why not in (None, "missing"):
            found.conflicts.append((png, png_why))
        if txt_why is not None:
            found.conflicts.append((txt, txt_why))
        if png_why is None:
            found.keep.append(index)
            if txt_why is not None or not os.path.lexists(txt):
                found.captions.append(index)
        else:
            found.draw.append(index)
    return found


def beyond(out: Path, count: int) -> int:
    """class_NNNNN.png files of ``out`` numbered ``count`` or more."""
    if not out.is_dir():
        return 0
    return sum(1 for p in out.iterdir() if (m := _NAME.fullmatch(p.name)) and int(m.group(1)) >= count)


def model_resolution(model: str) -> int:
    """The resolution of ``model``'s transformer, read from its config (no weights load)."""
    config = resolve_component(model, "transformer") / "config.json"
    try:
        return resolution_of(int(json.loads(config.read_text(encoding="utf-8"))["sample_size"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read the transformer config {config} ({error}); give a PixArt-Sigma pipeline folder in the diffusers layout") from None


def make_class_images(config: ClassImagesConfig, on_image: Callable[[int, int], None] | None = None) -> ClassImagesResult:
    """Fills ``config.out`` with ``config.count`` class images of ``config.prompt``; ``on_image(done, total)`` as they come.

    The folder is surveyed before the model loads: a conflict is refused then
    (unless ``overwrite``), and a folder that is complete loads no model at all.
    ``done`` counts the images kept too, so the first call reports those.
    """
    use_components(config.model, config.components)
    out = Path(config.out)
    refuse_unsafe_outputs([out], kind="folder", overwrite=True)  # it may exist and hold other files
    plan = survey(out, config.prompt, config.count)
    if plan.conflicts and not config.overwrite:
        path, why = plan.conflicts[0]
        more = f" (and {len(plan.conflicts) - 1} more class_* files)" if len(plan.conflicts) > 1 else ""
        raise UserError(
            f"{path} {why}{more}; pass --overwrite to redraw them (only class_NNNNN files are replaced, "
            f"other files in {out} stay), or choose another --out"
        )
    target = out.resolve()  # files_into writes beside the folder: its real parent, also for --out .
    target.mkdir(parents=True, exist_ok=True)
    for index in plan.captions:
        _write(target, index, config.prompt)
    done = len(plan.keep)
    if on_image is not None:
        on_image(done, config.count)
    if plan.draw:
        sampler = Sampler(config.model, device=config.device, dtype=config.dtype)
        height, width = bucket_size(sampler, config.aspect, config.size)
        sampler.check_size(height, width)
        resolution = sampler.resolution
        for index in plan.draw:
            seed = config.seed + index
            image = sampler.generate(
                [config.prompt], [seed], negative_prompt=config.negative_prompt, steps=config.steps,
                guidance=config.guidance, height=height, width=width,
            )[0]
            parameters = {
                "prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": seed, "steps": config.steps,
                "guidance": config.guidance, "height": height, "width": width, "model": config.model, "adapters": [],
            }
            _write(target, index, config.prompt, image, parameters)
            done += 1
            if on_image is not None:
                on_image(done, config.count)
    else:
        resolution = model_resolution(config.model)
    return ClassImagesResult(
        out=out,
        images=[out / image_name(i) for i in range(config.count)],
        drawn=len(plan.draw),
        kept=len(plan.keep),
        beyond=beyond(out, config.count),
        resolution=resolution,
    )


def _write(target: Path, index: int, prompt: str, image: Image.Image | None = None, parameters: dict | None = None) -> None:
    """The caption of image ``index`` and, when given, the image, each renamed into ``target`` complete (PNG first)."""
    with files_into(target) as tmp:
        if image is not None:
            save_png(image, tmp / image_name(index), parameters or {})
        (tmp / caption_name(index)).write_text(prompt + "\n", encoding="utf-8")
