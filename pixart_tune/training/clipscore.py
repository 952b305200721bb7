"""CLIP score of generated images against their prompts: does the model still draw what it is asked?

The score is torchmetrics' ``CLIPScore`` (``torchmetrics.multimodal.clip_score``,
after Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning"): ``100 * max(cos(E_I, E_T), 0)`` for the image and text embeddings of a
CLIP model, so 0 to 100, higher where the image matches the text better. Computed
here with transformers' ``CLIPModel`` directly, which torchmetrics wraps, so no
extra dependency. A LoRA that over-fits its images draws them whatever the prompt
says; the score of prompts unlike the training captions then falls.
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

SETTING = "validation.clip_model"
"""The recipe key every message about the CLIP model names."""
SCORE_SCALE = 100.0
"""torchmetrics' scale: a cosine of 0.3 scores 30."""


def clip_source(model: str) -> str:
    """What ``from_pretrained`` loads for ``model``: its folder, or a hub id (or its cached folder when offline).

    Looked up before any weights load, so a misspelt name fails when validation is
    set up, not at the first validation hours later.
    """
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if looks_like_path(model):
        raise UserError(f"{SETTING} {model!r}: no such folder; give a CLIP model folder or a hub id such as openai/clip-vit-large-patch14")
    return hub_source(model, "CLIP model", SETTING)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos(image, text), 0)`` of each row pair ([N, D] each -> [N], fp32)."""
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return SCORE_SCALE * cosine.clamp(min=0)


def _features(output) -> torch.Tensor:
    """The projected embedding, whether transformers returns it as a tensor (4.x) or as ``pooler_output`` (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """Scores (image, prompt) pairs; the model loads on the first :meth:`score` and is freed by :meth:`close`."""

    def __init__(self, model: str, device: torch.device | str, dtype: torch.dtype | None = None):
        """``model``: a CLIP folder or hub id; ``dtype``: the weights' (bf16 on CUDA, fp32 on a CPU by default)."""
        self.model_name, self.device = model, torch.device(device)
        self.dtype = dtype or auto_dtype(self.device)
        self.source = clip_source(model)
        self._model = None
        self._processor = None

    def _load(self) -> None:
        from transformers import AutoConfig, CLIPModel, CLIPProcessor

        logger.info("loading the CLIP model %s", self.model_name)
        try:
            model_type = AutoConfig.from_pretrained(self.source).model_type
            if model_type != "clip":
                raise ValueError(f"it is a {model_type} model, not CLIP")
            self._processor = CLIPProcessor.from_pretrained(self.source)
            self._model = CLIPModel.from_pretrained(self.source, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"cannot load {SETTING} {self.model_name!r} ({first}); give a CLIP model folder or hub id that transformers' "
                "CLIPModel loads, e.g. openai/clip-vit-large-patch14, or set validation.clip_model=null"
            ) from None
        self._model.to(self.device).eval().requires_grad_(False)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def to(self, device: torch.device | str) -> "ClipScorer":
        """Moves the model (once loaded) to ``device``: the CPU between validations, back for scoring."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @property
    def max_tokens(self) -> int:
        """The text tower's positions: longer prompts are cut there, as CLIP was trained (77 for OpenAI's)."""
        return self._model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings ([N, D] each), as CLIP projects them."""
        if self._model is None:
            self._load()
        pixels = self._processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self._processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        image_embeds = _features(self._model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        text_embeds = _features(self._model.get_text_features(**text.to(self.device)))
        return image_embeds, text_embeds

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The CLIP score (0 to 100) of each image against the prompt at the same position."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; score each image against its own prompt")
        if not images:
            return []
        image_embeds, text_embeds = self.embed(images, prompts)
        return clip_score(image_embeds, text_embeds).cpu().tolist()

    def close(self) -> None:
        """Frees the model (and its device memory); a later :meth:`score` loads it again."""
        from diffusers.training_utils import free_memory

        self._model = None
        self._processor = None
        free_memory()
