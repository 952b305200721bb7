"""One generation path, used by trainer validation, the ``sample`` verb and the app.

``generate`` runs a loaded ``PixArtSigmaPipeline`` one seed at a time with its own
generator, so image k of a call depends only on (prompt, seed k) and not on the
batch it came in: the base and the adapted model compared with the same seeds
start from the same noise. ``image_grid`` and ``save_png`` lay out and keep what
it draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from pixart_tune.base import MAX_TOKENS
from pixart_tune.encoders import vae_decode


def generate(
    pipe,
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    *,
    height: int,
    width: int,
    steps: int = 20,
    guidance: float = 4.5,
    negative_prompt: str = "",
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    show_progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Images for ``prompts[i]`` (or ``prompt_embeds[i]``) with ``seeds[i]``.

    ``on_step(done, steps)`` after each denoising step of each image (the app's progress).

    Pass cached T5 embeddings (and masks) instead of prompts to sample without a
    text encoder in memory; the negative embedding is then required too.
    ``height`` and ``width`` are used as given (no resolution binning), so pass a
    bucket of the aspect-ratio table.
    """
    count = len(seeds)
    if prompts is not None and len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts but {count} seeds")
    if prompts is None and (prompt_embeds is None or negative_prompt_embeds is None):
        raise ValueError("pass prompts, or prompt_embeds with negative_prompt_embeds")
    pipe.set_progress_bar_config(disable=not show_progress)
    device = pipe._execution_device
    images = []
    for i, seed in enumerate(seeds):
        kwargs = dict(
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=torch.Generator(device="cpu").manual_seed(int(seed)),
            use_resolution_binning=False,
            max_sequence_length=MAX_TOKENS,
            # Captions are cached raw; the pipeline's caption cleaning would encode
            # something else at inference than the model saw in training.
            clean_caption=False,
        )
        if on_step is not None:
            kwargs.update(callback=lambda index, _timestep, _latents: on_step(index + 1, steps), callback_steps=1)
        if prompts is not None:
            kwargs.update(prompt=prompts[i], negative_prompt=negative_prompt)
        else:
            kwargs.update(
                prompt_embeds=prompt_embeds[i : i + 1].to(device),
                prompt_attention_mask=prompt_attention_mask[i : i + 1].to(device),
                negative_prompt_embeds=negative_prompt_embeds[:1].to(device),
                negative_prompt_attention_mask=negative_prompt_attention_mask[:1].to(device),
                negative_prompt=None,
            )
        with torch.inference_mode():
            latents = pipe(**kwargs, output_type="latent").images
            images += decode_latents(pipe, latents)
    return images


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from the transformer's latents, decoded by the pipeline's VAE (:func:`vae_decode`)."""
    return pipe.image_processor.postprocess(vae_decode(pipe.vae, latents), output_type="pil")


def image_grid(
    images: Sequence[Image.Image],
    cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Tiles equal-sized images row by row, with optional labels on the left and top."""
    if not images:
        raise ValueError("no images to tile")
    rows = -(-len(images) // cols)
    w, h = images[0].size
    left = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = 20 if col_labels else 0
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        grid.paste(image.convert("RGB").resize((w, h)), (left + c * w, top + r * h))
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * w + 4, 4), label, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + r * h + h // 2), label, fill="black")
    return grid


def save_png(image: Image.Image, path: str | Path, parameters: dict) -> Path:
    """Writes ``image`` with ``parameters`` in the PNG text chunk.

    Two entries: ``parameters``, one human-readable line as other image tools show
    it, and ``pixart-tune``, the same as JSON for programs.
    """
    info = PngInfo()
    readable = ", ".join(f"{k}: {v}" for k, v in parameters.items() if k not in ("prompt", "negative_prompt"))
    info.add_text("parameters", f"{parameters.get('prompt', '')}\nNegative prompt: {parameters.get('negative_prompt', '')}\n{readable}")
    info.add_text("pixart-tune", json.dumps(parameters))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
