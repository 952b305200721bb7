"""The VAE and T5 around PixArt-Sigma's transformer: what data, training and sampling all stand on.

VAE latents (encode, and decode with the same scaling and shift) and T5 prompt
embeddings.

Both load lazily, on the first entry that is not cached yet, so a re-run over a
finished dataset loads neither; both are freed by ``close()``. Text goes through
``PixArtSigmaPipeline.encode_prompt`` itself (with no transformer and no VAE), so
training sees exactly the embeddings and masks that inference computes.

Cache keys need to know *which* weights made a feature without loading them:
``component_fingerprint`` hashes each component's configs in full and each weight
file's name, size, first and last MiB. Fine-tuned weights change those bytes; a
different model in the same folder gets a different key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Iterator, Sequence

import torch
from diffusers.training_utils import free_memory
from PIL import Image

from pixart_tune import models
from pixart_tune.base import MAX_TOKENS
from pixart_tune.hub import local_model, resolve_component

logger = logging.getLogger(__name__)

_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".pt")
_EDGE = 1 << 20


def component_fingerprint(model: str, subfolder: str) -> str:
    folder = resolve_component(model, subfolder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        digest.update(path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with path.open("rb") as file:
            if size <= 2 * _EDGE:
                digest.update(file.read())
            else:
                digest.update(file.read(_EDGE))
                file.seek(size - _EDGE)
                digest.update(file.read(_EDGE))
    return digest.hexdigest()[:32]


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1], the VAE's input convention (same as the pipelines')."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(list(images))))


class LatentEncoder:
    """VAE latents of bucketed images: the posterior mean, times the scaling factor.

    The mean (not a sample) is stored: it is deterministic, so a cache entry depends
    on its key alone; the VAE's posterior std on real photos is tiny next to the
    noise the trainer adds.
    """

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model, self.device, self.dtype = model, device, dtype
        self._vae = None
        self.loaded = False
        """Whether the VAE was loaded (a re-run over a finished dataset never loads it)."""

    @property
    def vae(self):
        if self._vae is None:
            logger.info("loading the VAE of %s", self.model)
            self.loaded = True
            self._vae = models.load_vae(local_model(self.model, "vae"), self.dtype).to(self.device).eval().requires_grad_(False)
            # One image at a time through the VAE: its encoder's activations grow with
            # the pixels (about 2.5 GiB per megapixel in fp32), so a batch of 8 would
            # need ~20 GiB at 1024 px and ~80 GiB at 2048 px; latents are the same.
            self._vae.enable_slicing()
        return self._vae

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, C, h, w] float32 latents for images of one size."""
        pixels = images_to_tensor(images).to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        config = self.vae.config
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return (latents * config.scaling_factor).float().cpu()

    def close(self) -> None:
        if self._vae is not None:  # a full gc pass costs a quarter second with torch loaded: only when it frees something
            self._vae = None
            free_memory()


@torch.inference_mode()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents as :meth:`LatentEncoder.encode` writes them (scaling and shift undone).

    The SDXL VAE of PixArt-Sigma overflows in fp16 (black or NaN images); its config
    says so with ``force_upcast``, and, as diffusers' SDXL pipeline does (the PixArt
    pipeline does not), the decode then runs in fp32.
    """
    config = vae.config
    upcast = vae.dtype == torch.float16 and bool(getattr(config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        return vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)


class TextEncoder:
    """T5 embeddings and masks of prompts, through the pipeline's own ``encode_prompt``."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, load_in_8bit: bool = False, max_tokens: int = MAX_TOKENS):
        self.model, self.device, self.dtype = model, device, dtype
        self.load_in_8bit, self.max_tokens = load_in_8bit, max_tokens
        self._tokenizer = None
        self._pipe = None
        self.loaded = False
        """Whether T5 was loaded (the tokenizer alone does not count)."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(local_model(self.model, "tokenizer"))
        return self._tokenizer

    def count_tokens(self, captions: Sequence[str]) -> list[int]:
        """Tokens per caption with the model's tokenizer, end-of-sequence token included."""
        # verbose=False: counting captions longer than T5 reads is the point here, not a mistake to warn about
        return [len(ids) for ids in self.tokenizer(list(captions), add_special_tokens=True, verbose=False)["input_ids"]]

    @property
    def pipe(self):
        if self._pipe is None:
            logger.info("loading the text encoder of %s", self.model)
            self.loaded = True
            encoder = models.load_text_encoder(local_model(self.model, "text_encoder"), self.dtype, load_in_8bit=self.load_in_8bit, device=self.device)
            encoder.eval().requires_grad_(False)
            # The family's own encode_prompt (PixArt-Sigma's or PixArt-alpha's).
            self._pipe = models.pipeline_class(self.model)(tokenizer=self.tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        return self._pipe

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [N, max_tokens, D], mask [N, max_tokens]) exactly as inference computes them.

        Over-long captions are cut to ``max_tokens`` without a word here: prepare
        counts them and names them in its summary. The pipeline would log the cut
        part of every caption in the batch, each short one padded to the longest
        one's length (157 kB of ``<pad>`` for one long caption among 20).
        """
        pipe = self.pipe
        with _silenced(type(pipe).__module__, "transformers.tokenization_utils_base"):
            embeds, mask, _, _ = pipe.encode_prompt(
                list(captions),
                do_classifier_free_guidance=False,
                device=self.device,
                clean_caption=False,
                max_sequence_length=self.max_tokens,
            )
        return embeds.cpu(), mask.cpu()

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe = None
            free_memory()


@contextlib.contextmanager
def _silenced(*names: str) -> Iterator[None]:
    """The named loggers show only errors inside the block (their warnings are ours to give)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
