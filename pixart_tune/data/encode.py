"""The two encoders of the cache: VAE latents and T5 prompt embeddings.

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
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers.training_utils import free_memory
from PIL import Image

from pixart_tune import models
from pixart_tune.errors import UserError

logger = logging.getLogger(__name__)

_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".pt")
_EDGE = 1 << 20


def resolve_component(model: str, subfolder: str) -> Path:
    """The local folder of ``subfolder`` of a model folder or hub id (downloading when online)."""
    local = Path(model) / subfolder
    if local.is_dir():
        return local
    if Path(model).is_dir():
        raise UserError(f"{model} has no {subfolder}/ folder; point --model at a PixArt-Sigma pipeline folder in the diffusers layout")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UserError(f"model folder {model} does not exist; give a pipeline folder (pixart-tune init-tiny makes a tiny one) or a hub id")
    if (model, subfolder) not in _HUB_FOLDERS:
        from huggingface_hub import snapshot_download

        # One look-up, no retries: without a network it falls back to the local cache at once.
        try:
            _HUB_FOLDERS[model, subfolder] = Path(snapshot_download(model, allow_patterns=[f"{subfolder}/*"])) / subfolder
        except Exception as error:  # hub errors come in many classes; hub_trouble sorts them into one line
            raise hub_trouble(model, "model", "--model", error) from None
    return _HUB_FOLDERS[model, subfolder]


# (hub id, subfolder) -> its folder in the local cache: each is looked up once a run
_HUB_FOLDERS: dict[tuple[str, str], Path] = {}


def local_model(model: str, subfolder: str) -> str:
    """The local folder of a model folder or hub id that holds ``subfolder``, for ``from_pretrained(..., subfolder=...)``.

    Loading a hub model from its folder in the cache asks the network nothing:
    ``from_pretrained`` given the id asks about every file again, and without a
    network retries each one it has not cached (optional files included) for minutes.
    """
    return str(resolve_component(model, subfolder).parent)


def hub_trouble(model: str, what: str, flag: str, error: BaseException | None) -> UserError:
    """One line that says why hub model ``model`` cannot be had, and what to do instead.

    ``error`` is what the hub client raised (None: offline mode, nothing cached).
    The client's own messages run to several lines and name environment variables
    and URLs of its documentation; the person needs the model's name and a way on.
    """
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cause = None if error is None else (error.__cause__ or error)
    local = f"or pass a local folder to {flag}"
    if isinstance(cause, GatedRepoError):
        return UserError(f"{what} {model!r} is gated on the Hugging Face Hub: accept its terms at {constants.ENDPOINT}/{model} and log in (hf auth login), {local}")
    if isinstance(cause, RepositoryNotFoundError):
        return UserError(f"no {what} {model!r} on the Hugging Face Hub: check the id (a private one needs hf auth login), {local}")
    if error is None or is_offline_mode():
        return UserError(f"{what} {model!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): unset it to download the {what}, {local}")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        reason = f"HTTP {cause.response.status_code}"
    else:
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:120]
    return UserError(
        f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}: {reason}) to download {what} {model!r}, and it is not in the local cache: "
        f"connect and run again, or download it where there is a network (hf download {model}) and pass its folder to {flag}"
    )


def hub_source(model: str, what: str, flag: str) -> str:
    """What ``from_pretrained`` should load for hub id ``model``: the id when the hub answers, else its folder in the local cache.

    One request, no retries, before ``from_pretrained`` makes its own: without a
    network, the hub client tries each file it has not cached six times with
    growing pauses (minutes of retry lines before transformers' error), optional
    files such as ``adapter_config.json`` included, so a cached copy is loaded
    from its folder, which asks the network nothing.
    Raises a one-line :func:`hub_trouble` error when the model can be neither
    reached nor found in the cache.
    """
    from huggingface_hub import HfApi, constants, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        config = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid hub id (HFValidationError)
        raise UserError(f"{what} {model!r} is neither a folder nor a Hugging Face Hub id (owner/name); {flag} takes either") from None
    cached = str(Path(config).parent) if isinstance(config, str) else None
    if is_offline_mode():
        if cached:
            return cached
        raise hub_trouble(model, what, flag, None)
    try:
        HfApi().model_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # connection, timeout, proxy, TLS, HTTP status: many classes, one line
        if cached and not isinstance(error, RepositoryNotFoundError):
            logger.warning("cannot reach the Hugging Face Hub (%s); loading %s %s from the local cache", type(error).__name__, what, model)
            return cached
        raise hub_trouble(model, what, flag, error) from None
    return model


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


def default_text_dtype(device: torch.device) -> torch.dtype:
    """T5's dtype unless told otherwise: bf16 on CUDA, fp32 on a CPU (slow bf16 matmuls there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TextEncoder:
    """T5 embeddings and masks of prompts, through the pipeline's own ``encode_prompt``."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, load_in_8bit: bool = False, max_tokens: int = models.MAX_TOKENS):
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
            from diffusers import PixArtSigmaPipeline

            logger.info("loading the text encoder of %s", self.model)
            self.loaded = True
            encoder = models.load_text_encoder(local_model(self.model, "text_encoder"), self.dtype, load_in_8bit=self.load_in_8bit, device=self.device)
            encoder.eval().requires_grad_(False)
            self._pipe = PixArtSigmaPipeline(tokenizer=self.tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
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
