"""Automatic captions from a vision-language model, loaded with transformers.

Default: Florence-2 large (``florence-community/Florence-2-large``, native in
transformers, 0.77B parameters) with its ``<MORE_DETAILED_CAPTION>`` task, the
captioner most PixArt / SD3 / Flux fine-tuning guides and tools use: PixArt-Sigma
was trained on long, dense captions, and Florence-2 writes a paragraph where BLIP
writes one short line. Any model that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load and that takes (images, text) directly also works: BLIP
(``Salesforce/blip-image-captioning-large``), BLIP-2, GIT. Chat models that need
a chat template are not supported here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from pixart_tune.base import auto_dtype
from pixart_tune.errors import UserError
from pixart_tune.hub import hub_source, looks_like_path

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "florence-community/Florence-2-large"

# Task prompts by model type; models not listed caption without a prompt.
DEFAULT_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}

# Room for a whole paragraph: Florence-2's detailed captions run to about 150
# tokens, and a caption cut mid-sentence teaches the model a cut-off sentence.
# Generation stops at the end of the caption, so the limit costs nothing.
MAX_NEW_TOKENS = 256


class Captioner:
    """Captions batches of images; the model loads on the first batch and is freed by ``close()``."""

    def __init__(self, model: str, device: torch.device, prompt: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS, dtype: torch.dtype | None = None):
        self.model_name, self.device = model, device
        self.dtype = dtype or auto_dtype(device)
        self.max_new_tokens = max_new_tokens
        self._prompt = prompt
        self._model = None
        self._processor = None

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = self.model_name
        if not Path(source).is_dir():
            if looks_like_path(source):
                raise UserError(f"cannot load captioner {source!r}: no such folder; give a folder or a hub id to --captioner")
            source = hub_source(source, "captioner", "--captioner")
        logger.info("loading the captioner %s", self.model_name)
        try:
            self._processor = AutoProcessor.from_pretrained(source)
            self._model = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype)
        except (OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"cannot load captioner {self.model_name!r} ({first}); give a local folder or hub id of an image-to-text model "
                "that transformers loads natively, e.g. florence-community/Florence-2-large or Salesforce/blip-image-captioning-large"
            ) from None
        self._model.to(self.device).eval().requires_grad_(False)
        if self._prompt is None:
            self._prompt = DEFAULT_PROMPTS.get(self._model.config.model_type)

    @property
    def prompt(self) -> str | None:
        if self._model is None:
            self._load()
        return self._prompt

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        prompt = self.prompt  # loads the model
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self._processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # Greedy with beams, as the Florence-2 and BLIP model cards do: the same image
        # always gets the same caption, so re-runs hit the text cache.
        output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=3, do_sample=False)
        if not self._model.config.is_encoder_decoder and "input_ids" in inputs and output.shape[1] > inputs["input_ids"].shape[1]:
            if torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]):
                output = output[:, inputs["input_ids"].shape[1] :]
        texts = self._processor.batch_decode(output, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def close(self) -> None:
        from diffusers.training_utils import free_memory

        self._model = None
        self._processor = None
        free_memory()
