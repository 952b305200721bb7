"""Validation grids of a training run: fixed prompts and seeds, drawn by the model being trained.

The prompts are encoded once at start-up, before the transformer is loaded, so T5
never shares the device with it, and in the dtype ``prepare`` encodes captions in
by default (bf16 on CUDA, fp32 on a CPU), so they read like the training captions.
Grids are drawn from those embeddings; the VAE waits on the CPU between validations. The first grid of
a run (or of a resumed run) has a companion drawn with the adapter off, so each
step's grid can be held against the base model.

With ``validation.clip_model`` set, each image of the model's grid is scored
against its prompt (:mod:`pixart_tune.training.clipscore`), and the base grid once,
so a falling score shows prompts losing their hold on the images. CLIP waits on the
CPU between validations, like the VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pixart_tune.adapters.lora import disabled_adapters
from pixart_tune.base import auto_dtype
from pixart_tune.fsutil import atomic_path
from pixart_tune.models import load_pipeline, load_vae
from pixart_tune.training.clipscore import ClipScorer
from pixart_tune.training.config import ValidationSection


def encode_prompts(model: str, prompts: list[str], device: torch.device, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings and masks of ``prompts``, on the CPU; T5 is freed before returning."""
    from pixart_tune.encoders import TextEncoder

    # prepare's default, so the prompts read like the training captions.
    encoder = TextEncoder(model, device, auto_dtype(device), max_tokens=max_tokens)
    try:
        embeds, mask = encoder.encode(prompts)
        return embeds.cpu(), mask.cpu()
    finally:
        encoder.close()


class Validator:
    """Renders ``samples/step-NNNNNN.png`` (and ``samples/base.png`` once) for one run."""

    def __init__(
        self,
        config: ValidationSection,
        model: str,
        transformer: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        prompts: tuple[torch.Tensor, torch.Tensor],
        resolution: int,
        negative: tuple[torch.Tensor, torch.Tensor],
    ):
        """``prompts`` and ``negative``: (embeddings, mask) of the prompts (from
        :func:`encode_prompts`) and of the empty prompt."""
        self.config, self.transformer, self.device, self.dtype = config, transformer, device, dtype
        self.height = config.height or resolution
        self.width = config.width or resolution
        self.embeds, self.mask = prompts
        self.negative = negative
        # The pipeline decodes latents of the transformer's dtype, so the VAE loads in
        # that dtype. No pipeline-wide dtype: it would cast the passed transformer's
        # fp32 LoRA weights too.
        self.pipe = load_pipeline(model, None, transformer=transformer, vae=load_vae(model, dtype), text_encoder=None, tokenizer=None)
        self.base_rendered = False
        self.last_images: list[Image.Image] = []
        """The images of the last :meth:`render`, prompt by prompt, seed by seed within a prompt."""
        self.last_scores: dict[str, float] = {}
        """CLIP scores of the last :meth:`grids` (empty without ``clip_model``), as the trackers log them."""
        # Only looked up here (a misspelt name fails now); the weights load at the first validation.
        self.clip = ClipScorer(config.clip_model, device) if config.clip_model else None

    def images_due(self) -> int:
        """How many images the next :meth:`grids` call draws (the base model's too, the first time)."""
        per_grid = len(self.config.prompts) * len(self.config.seeds)
        return per_grid * (2 if self.config.base and not self.base_rendered else 1)

    @torch.no_grad()
    def grids(self) -> tuple[Image.Image, Image.Image | None]:
        """The grid of the model as it is now, and the base model's when it is due (once)."""
        base = None
        base_images: list[Image.Image] = []
        was_training = self.transformer.training
        self.transformer.eval()
        self.pipe.vae.to(self.device)
        # Validation must not move the training RNG streams (LoRA dropout).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.config.base and not self.base_rendered:
                with disabled_adapters(self.transformer):
                    base = self.render()
                base_images = self.last_images
                self.base_rendered = True
            grid = self.render()
        self.pipe.vae.to("cpu")
        self.transformer.train(was_training)
        self.last_scores = self.score(self.last_images, base_images)
        return grid, base

    def score(self, images: list[Image.Image], base_images: list[Image.Image]) -> dict[str, float]:
        """CLIP scores of the model's images (and the base model's, when given) against their prompts.

        CLIP comes to the device only now, after the transformer has drawn, and goes
        back to the CPU after, so it never adds to the peak of a training step.
        """
        if self.clip is None:
            return {}
        prompts = [prompt for prompt in self.config.prompts for _ in self.config.seeds]
        self.clip.to(self.device)
        try:
            scores = self.clip.score(images, prompts)
            base_scores = self.clip.score(base_images, prompts) if base_images else []
        finally:
            self.clip.to("cpu")
        return clip_score_summary(scores, base_scores, len(self.config.seeds))

    def close(self) -> None:
        """Frees the CLIP model (the pipeline goes with the validator)."""
        if self.clip is not None:
            self.clip.close()

    def render(self) -> Image.Image:
        """One row per prompt, one column per seed."""
        from pixart_tune.generation import generate, image_grid

        seeds = list(self.config.seeds)
        count = len(seeds)
        empty_embeds, empty_mask = self.negative
        images = []
        for i in range(len(self.config.prompts)):
            images += generate(
                self.pipe, None, seeds, height=self.height, width=self.width, steps=self.config.steps, guidance=self.config.guidance,
                prompt_embeds=self.embeds[i : i + 1].expand(count, -1, -1).to(self.dtype),
                prompt_attention_mask=self.mask[i : i + 1].expand(count, -1),
                negative_prompt_embeds=empty_embeds[None],
                negative_prompt_attention_mask=empty_mask[None],
            )
        self.last_images = images
        labels = [p if len(p) <= 24 else p[:23] + "…" for p in self.config.prompts]
        return image_grid(images, cols=count, row_labels=labels, col_labels=[f"seed {s}" for s in seeds])


def clip_score_summary(scores: list[float], base_scores: list[float], per_prompt: int) -> dict[str, float]:
    """``validation/clip_score`` (the mean), ``validation/clip_score_<i>`` (prompt i's mean over its seeds)
    and, given the base model's scores, ``validation/clip_score_base``."""
    summary = {"validation/clip_score": sum(scores) / len(scores)}
    for i in range(len(scores) // per_prompt):
        row = scores[i * per_prompt : (i + 1) * per_prompt]
        summary[f"validation/clip_score_{i}"] = sum(row) / len(row)
    if base_scores:
        summary["validation/clip_score_base"] = sum(base_scores) / len(base_scores)
    return summary


def save_grid(grid: Image.Image, path: Path, writer=None, tag: str = "validation", step: int = 0) -> None:
    """The grid as a PNG (atomically) and, given a TensorBoard writer, as an image there."""
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    if writer is not None:
        import numpy as np

        writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
