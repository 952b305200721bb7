"""Validation grids of a training run: fixed prompts and seeds, drawn by the model being trained.

The prompts are encoded once at start-up, before the transformer is loaded, so T5
never shares the device with it, and in the dtype ``prepare`` encodes captions in
by default (bf16 on CUDA, fp32 on a CPU), so they read like the training captions.
Grids are drawn from those embeddings; the VAE waits on the CPU between validations. The first grid of
a run (or of a resumed run) has a companion drawn with the adapter off, so each
step's grid can be held against the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pixart_tune.adapters.lora import disabled_adapters
from pixart_tune.base import auto_dtype
from pixart_tune.fsutil import atomic_path
from pixart_tune.models import load_vae
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
        from diffusers import PixArtSigmaPipeline

        self.config, self.transformer, self.device, self.dtype = config, transformer, device, dtype
        self.height = config.height or resolution
        self.width = config.width or resolution
        self.embeds, self.mask = prompts
        self.negative = negative
        # The pipeline decodes latents of the transformer's dtype, so the VAE loads in
        # that dtype. No pipeline-wide dtype: it would cast the passed transformer's
        # fp32 LoRA weights too.
        self.pipe = PixArtSigmaPipeline.from_pretrained(
            model, transformer=transformer, vae=load_vae(model, dtype), text_encoder=None, tokenizer=None
        )
        self.base_rendered = False

    def images_due(self) -> int:
        """How many images the next :meth:`grids` call draws (the base model's too, the first time)."""
        per_grid = len(self.config.prompts) * len(self.config.seeds)
        return per_grid * (2 if self.config.base and not self.base_rendered else 1)

    @torch.no_grad()
    def grids(self) -> tuple[Image.Image, Image.Image | None]:
        """The grid of the model as it is now, and the base model's when it is due (once)."""
        base = None
        was_training = self.transformer.training
        self.transformer.eval()
        self.pipe.vae.to(self.device)
        # Validation must not move the training RNG streams (LoRA dropout).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.config.base and not self.base_rendered:
                with disabled_adapters(self.transformer):
                    base = self.render()
                self.base_rendered = True
            grid = self.render()
        self.pipe.vae.to("cpu")
        self.transformer.train(was_training)
        return grid, base

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
        labels = [p if len(p) <= 24 else p[:23] + "…" for p in self.config.prompts]
        return image_grid(images, cols=count, row_labels=labels, col_labels=[f"seed {s}" for s in seeds])


def save_grid(grid: Image.Image, path: Path, writer=None, tag: str = "validation", step: int = 0) -> None:
    """The grid as a PNG (atomically) and, given a TensorBoard writer, as an image there."""
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    if writer is not None:
        import numpy as np

        writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
