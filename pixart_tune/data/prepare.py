"""``pixart-tune prepare``: a folder or dataset of images in, a cached training set out.

One streaming pass reads each image, validates it, finds exact duplicates,
chooses its bucket and caption, and encodes its latent in per-bucket batches;
a second pass encodes the captions with T5. Reading, decoding and cropping run on
a pool of threads ahead of the VAE (``stage.py``); only small records (paths,
hashes, captions) stay in memory, never pixels. Every cache entry is written
atomically under a content key, so an interrupted run resumes and a re-run
encodes only what changed; a scan index (``scanindex.py``) lets a re-run
recognise unchanged files without decoding them. The source is only read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import ImageColor
from tqdm.auto import tqdm

from pixart_tune import models
from pixart_tune.base import DTYPE_CHOICES, REAL_MODEL_ID, REPORT, RESOLUTIONS, auto_dtype, resolve_dtype
from pixart_tune.data.buckets import CROPS
from pixart_tune.data.cache import CacheItem, FeatureCache, Manifest, content_key
from pixart_tune.data.captioner import MAX_NEW_TOKENS, Captioner
from pixart_tune.data.captions import CAPTION_SOURCES, clean, compose, distinct, filename_caption, sidecar_text, split_variants
from pixart_tune.data.duplicates import DuplicateFinder
from pixart_tune.data.images import DEFAULT_MAX_PIXELS, ImageSkip
from pixart_tune.data.masks import mask_key
from pixart_tune.data.outdir import check_out, locked_out
from pixart_tune.data.report import summary  # noqa: F401 - the verb's summary, imported from here by callers
from pixart_tune.data.scanindex import ScanIndex
from pixart_tune.data.sources import SOURCE_KINDS, Entry, open_source
from pixart_tune.data.stage import Bucketed, ImageStage, Outcome, StageSettings
from pixart_tune.encoders import LatentEncoder, TextEncoder, component_fingerprint
from pixart_tune.fsutil import atomic_path, printable, read_regular
from pixart_tune.hub import resolve_component
from pixart_tune.parts import check_components, resolve_parts, use_components


@dataclasses.dataclass
class PrepareConfig:
    source: str
    """A folder of images (nested folders too), a ``save_to_disk`` folder, or a Hugging Face dataset name."""
    out: str
    """Folder for the prepared dataset (created; must not be inside ``source``)."""
    model: str = REAL_MODEL_ID
    """PixArt pipeline folder or hub id whose VAE and T5 encode the features (a model
    published as a transformer alone takes them from ``components``)."""
    components: str | None = None
    """Where the VAE, T5, tokenizer and scheduler come from: a pipeline folder or hub id.
    Default: the model itself when it holds them, else its family's component
    repository (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers for PixArt-Sigma).
    Recorded in dataset.json, so training uses the same."""
    resolution: int = 1024
    """Bucket table: 256, 512, 1024 or 2048 (diffusers' ASPECT_RATIO_*_BIN)."""
    source_kind: str = "auto"
    """auto, folder, saved (save_to_disk) or hub."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    image_column: str | None = None
    """Dataset column holding images; default: the first Image column."""
    caption_column: str | None = None
    """Metadata/dataset column holding captions; default: the first of text, caption, prompt, description."""
    mask_column: str | None = None
    """Dataset column holding loss masks (images; white trains, black does not); default: the column mask, if there is one."""
    mask_from_alpha: bool = False
    """Use each image's alpha channel as its loss mask (an image without transparency has none; a NAME.mask.png file wins)."""
    caption_order: tuple[str, ...] = ("sidecar", "metadata", "filename", "captioner")
    """Where captions come from, first hit wins (see docs/prepare.md)."""
    captioner: str | None = None
    """Vision-language model (hub id or folder) that captions images with no other caption."""
    captioner_prompt: str | None = None
    """Task prompt for the captioner; default: <MORE_DETAILED_CAPTION> for Florence-2, none for BLIP."""
    captioner_batch_size: int = 8
    """Images per captioner batch."""
    caption_max_new_tokens: int = MAX_NEW_TOKENS
    """Longest caption the captioner may write, in its own tokens."""
    trigger: str = ""
    """Trigger word put first in every caption (unless already there)."""
    prefix: str = ""
    """Added verbatim before every caption (include your own space or comma)."""
    suffix: str = ""
    """Added verbatim after every caption."""
    caption_variants: bool = False
    """Several captions per image: each non-empty line of a sidecar, each string of a list-valued metadata column,
    is one caption, all encoded; training draws one each time it sees the image. Off: a sidecar's lines are joined
    into one caption, a list gives its first string."""
    crop: str = "center"
    """center, top, or random (seeded by the image content, so stable across runs)."""
    max_upscale: float = 2.0
    """Images needing more than this upscaling to cover their bucket are skipped as too small."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images claiming more pixels than this are skipped as decompression bombs."""
    background: str = "white"
    """Colour that transparent pixels are composited onto (a name or #rrggbb)."""
    keep_duplicates: bool = False
    """Train on every copy of an exact duplicate (default: the first copy only)."""
    batch_size: int = 8
    """Images per VAE batch."""
    text_batch_size: int = 32
    """Captions per T5 batch."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""
    vae_dtype: str = "fp32"
    """fp32 or bf16 (the SDXL VAE overflows in fp16)."""
    text_dtype: str = "auto"
    """fp32, bf16, or auto: bf16 on CUDA, fp32 on CPU."""
    text_8bit: bool = False
    """Load T5 in 8-bit with bitsandbytes (CUDA only): T5-XXL fits in about 5 GB."""
    max_tokens: int | None = None
    """T5 sequence length; default: the model family's (300 for PixArt-Sigma, 120 for PixArt-alpha)."""
    workers: int = 0
    """Threads that read, decode and crop images ahead of the VAE; 0: one per CPU core (at most 8); 1: no threads."""
    reduce_jpeg: bool = True
    """Decode JPEGs much bigger than their bucket at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling): several times faster."""
    progress: bool = True
    """Progress bars while scanning and encoding."""

    def __post_init__(self) -> None:
        self.caption_order = tuple(self.caption_order)
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {self.resolution}")
        if self.source_kind not in SOURCE_KINDS:
            raise ValueError(f"source_kind must be one of {', '.join(SOURCE_KINDS)}, got {self.source_kind!r}")
        unknown = [s for s in self.caption_order if s not in CAPTION_SOURCES]
        if unknown or len(set(self.caption_order)) != len(self.caption_order):
            raise ValueError(f"caption_order must list distinct entries of {', '.join(CAPTION_SOURCES)}, got {','.join(self.caption_order)}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.max_upscale < 1.0:
            raise ValueError(f"max_upscale must be >= 1.0 (1.0 means never upscale), got {self.max_upscale}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per CPU core) or more, got {self.workers}")
        for name in ("max_pixels", "batch_size", "text_batch_size", "captioner_batch_size", "caption_max_new_tokens", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.vae_dtype not in ("fp32", "bf16"):
            raise ValueError(f"vae_dtype must be fp32 or bf16, got {self.vae_dtype!r}")
        if self.text_dtype not in DTYPE_CHOICES:
            raise ValueError(f"text_dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.text_dtype!r}")
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ValueError(f"background {self.background!r} is not a colour; use a name like white or #rrggbb") from None

    def torch_device(self) -> torch.device:
        return models.default_device() if self.device == "auto" else torch.device(self.device)

    def text_torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.text_dtype == "auto":
            return auto_dtype(device)
        return resolve_dtype(self.text_dtype)

    def stage_settings(self) -> StageSettings:
        background = ImageColor.getrgb(self.background)[:3]
        return StageSettings(self.resolution, self.max_upscale, self.max_pixels, background, self.crop, self.reduce_jpeg, self.mask_from_alpha)


def bucketed_images(config: PrepareConfig) -> Iterator[tuple[Entry, Outcome]]:
    """Prepare's image stage alone: scan, read, decode, validate, bucket and crop, loading no model and writing nothing.

    Yields ``(entry, Bucketed or ImageSkip)`` in scan order, every ``Bucketed`` with
    its crop (``pixels``) and, if it has one, its mask's weights (``mask``), on ``config.workers`` threads. What ``prepare_dataset``
    does before the VAE, less duplicate finding; the throughput benchmark times it.
    """
    entries, _ = open_source(config.source, config.source_kind, config.split, config.image_column, config.caption_column, mask_column=config.mask_column)
    yield from ImageStage(config.stage_settings(), config.workers).run(entries)


@dataclasses.dataclass
class _Accepted:
    index: int
    source: str
    size: tuple[int, int]
    bucket: tuple[int, int]
    captions: list[str] | None
    """Found captions (one unless caption variants are on); None while the captioner has yet to write one;
    after ``encode_texts``, the final captions."""
    caption_source: str
    latent_key: str
    caption_key: str = ""
    """Key of the captioner's output for these pixels (captioned images only)."""
    mask_key: str | None = None
    mask_name: str | None = None
    mask_empty: bool = False
    """The mask's weights are 0 everywhere in the crop: the image trains only at the trainer's floor weight."""


class _Run:
    """State of one prepare run: the record lists and the two lazily loaded encoders."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        self.cache = FeatureCache(config.out)
        self.device = config.torch_device()
        self.accepted: list[_Accepted] = []
        self.skipped: list[dict[str, str]] = []
        self.unread: list[dict[str, str]] = []
        """Files other than images (metadata, caption files) that exist but could not be read."""
        self.ignored: list[dict[str, str]] = []
        """Files found but not used: masks with no image beside them."""
        self.duplicates: list[list[str]] = []
        self.counts = Counter()
        self.vae_dtype = resolve_dtype(self.config.vae_dtype)
        self.latents = LatentEncoder(config.model, self.device, self.vae_dtype)
        # image batches waiting for the VAE, by bucket; and waiting for the captioner
        self.pending: dict[tuple[int, int], list[tuple[str, Any]]] = defaultdict(list)
        self.to_caption: list[tuple[_Accepted, Any]] = []
        self.captioner = None
        self.latent_fingerprint = content_key(component_fingerprint(config.model, "vae"), config.vae_dtype)
        self.captioner_fingerprint = ""
        self.text_fingerprint = ""
        """The T5's fingerprint, read when the captions are encoded (the manifest records it)."""
        if self.captioner_enabled:
            # A local captioner is known by its files, a hub one by its name.
            weights = component_fingerprint(config.captioner, "") if Path(config.captioner).is_dir() else config.captioner
            self.captioner_fingerprint = content_key(weights, config.captioner_prompt or "", str(config.caption_max_new_tokens))
        settings = config.stage_settings()
        self.index = ScanIndex(config.out, settings.decode_key())
        self.stage = ImageStage(settings, config.workers, self.index, self.wants_pixels, self.wants_mask)
        self.finder = DuplicateFinder(self.full_hash, self.remember_full_hash)
        self.models_loaded: list[str] = []

    # pass 1: images ----------------------------------------------------------------
    def latent_key(self, pixel_hash: str, bucket: tuple[int, int]) -> str:
        return content_key("latent", pixel_hash, self.transform(bucket), self.latent_fingerprint)

    def caption_key(self, pixel_hash: str, bucket: tuple[int, int]) -> str:
        return content_key("caption", pixel_hash, self.transform(bucket), self.captioner_fingerprint)

    def transform(self, bucket: tuple[int, int]) -> str:
        # "box": the crop's region resampled straight to the bucket (see resize_to_bucket)
        return f"{bucket[0]}x{bucket[1]}|{self.config.crop}|lanczos-box"

    def mask_key(self, image: Bucketed) -> str:
        return mask_key(image.mask_hash, image.bucket, self.config.crop, image.crop_seed)

    def wants_mask(self, image: Bucketed) -> bool:
        """Whether an image's mask weights are needed (not cached). Called from decode threads."""
        return not self.cache.has_mask(self.mask_key(image))

    def full_hash(self, ref: tuple[Entry, str | None]) -> str:
        return self.stage.full_hash(ref[0])

    def remember_full_hash(self, ref: tuple[Entry, str | None], full_hash: str) -> None:
        self.index.note(ref[1], full=full_hash)

    def wants_pixels(self, image: Bucketed) -> bool:
        """Whether an image's crop is needed: its latent (or caption) is not cached. Called from decode threads."""
        if not self.cache.has_latent(self.latent_key(image.pixel_hash, image.bucket)):
            return True
        return self.captioner_enabled and not self.caption_path(self.caption_key(image.pixel_hash, image.bucket)).is_file()

    def add(self, entry: Entry, outcome: Outcome) -> None:
        config = self.config
        if isinstance(outcome, ImageSkip):
            return self.skip(entry.source, outcome.reason)
        first = self.finder.first_copy(entry.source, outcome.size, outcome.pixel_hash, outcome.scale, outcome.full_hash, ref=(entry, outcome.index_key))
        # a hint for the next run's decode threads: a duplicate's crop is not wanted (see ImageStage)
        self.index.note(outcome.index_key, duplicate=first is not None)
        if first is not None:
            self.duplicates.append([first, entry.source])
            if not config.keep_duplicates:
                return
        captions, caption_source = self.find_caption(entry)
        bucket = outcome.bucket
        item = _Accepted(len(self.accepted), entry.source, outcome.size, bucket, captions, caption_source, self.latent_key(outcome.pixel_hash, bucket))
        self.accepted.append(item)
        if outcome.mask_hash is not None:
            reason = self.add_mask(entry, item, outcome)
            if reason is not None:
                self.accepted.pop()
                return self.skip(entry.source, reason)
        need_latent = not self.cache.has_latent(item.latent_key) and item.latent_key not in {k for k, _ in self.pending[bucket]}
        need_caption = False
        if captions is None:  # the captioner's turn: reuse what it wrote for these pixels before
            item.caption_key = self.caption_key(outcome.pixel_hash, bucket)
            caption = self.read_caption(item.caption_key)
            item.captions = None if caption is None else [caption]
            need_caption = caption is None
            self.counts["captions_reused" if not need_caption else "captions_generated"] += 1
        if not (need_latent or need_caption):
            self.counts["latents_reused"] += 1
            return
        pixels, outcome.pixels = outcome.pixels, None
        if pixels is None:  # its latent was there when the decode thread looked, and is gone now
            again = self.stage.process(entry, force_pixels=True)
            if not isinstance(again, Bucketed):
                self.accepted.pop()
                return self.skip(entry.source, again.reason)
            pixels = again.pixels
        if need_latent:
            self.pending[bucket].append((item.latent_key, pixels))
            if len(self.pending[bucket]) >= config.batch_size:
                self.flush_bucket(bucket)
            elif sum(len(v) for v in self.pending.values()) >= 4 * config.batch_size:
                # many buckets each short of a batch: bound memory, encode them as they are
                for key in list(self.pending):
                    self.flush_bucket(key)
        else:
            self.counts["latents_reused"] += 1
        if need_caption:
            self.to_caption.append((item, pixels))
            if len(self.to_caption) >= config.captioner_batch_size:
                self.flush_captions()

    def add_mask(self, entry: Entry, item: _Accepted, outcome: Bucketed) -> str | None:
        """Caches the image's mask weights unless they are; None, or why the image must be skipped after all."""
        item.mask_key, item.mask_name = self.mask_key(outcome), outcome.mask_name
        if self.cache.has_mask(item.mask_key):
            self.counts["masks_reused"] += 1
            item.mask_empty = float(self.cache.read_mask(item.mask_key).max()) == 0.0
            return None
        if outcome.mask is None:  # not made on the decode thread (cached then, or a duplicate's hint): make it now
            again = self.stage.process(entry, force_pixels=True)
            if not isinstance(again, Bucketed) or again.mask is None:
                return again.reason if isinstance(again, ImageSkip) else "its mask changed while prepare ran; re-run prepare"
            outcome.mask = again.mask
            if outcome.pixels is None:  # decoded anyway: the latent or the captioner may want them too
                outcome.pixels = again.pixels
        self.counts["repaired"] += self.cache.mask_path(item.mask_key).exists()  # there, but damaged
        self.cache.write_mask(item.mask_key, torch.from_numpy(outcome.mask))
        item.mask_empty = float(outcome.mask.max()) == 0.0
        outcome.mask = None
        self.counts["masks_encoded"] += 1
        return None

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append({"source": source, "reason": reason})

    def caption_path(self, key: str) -> Path:
        return Path(self.config.out) / "captions" / f"{key}.txt"

    def read_caption(self, key: str) -> str | None:
        """The captioner's output for ``key``, if an earlier run wrote it whole (a damaged one is written again)."""
        try:
            return read_regular(self.caption_path(key)).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    @property
    def captioner_enabled(self) -> bool:
        return self.config.captioner is not None and "captioner" in self.config.caption_order

    def find_caption(self, entry: Entry) -> tuple[list[str] | None, str]:
        """(captions, where from): one caption, or with caption variants every one the source holds."""
        variants = self.config.caption_variants
        found: tuple[list[str] | None, str] = ([""], "none")
        several_unused = False  # sidecar lines or a metadata list left out: the summary points at --caption-variants
        for where in self.config.caption_order:
            several: list[str] = []
            if where == "sidecar" and entry.path is not None:
                text = sidecar_text(entry.path, Path(self.config.source), self.unread, entry.source)
                several = split_variants(text) if text else []
                captions = several if variants else distinct([clean(text or "")])
            elif where == "metadata":
                several = distinct([clean(c) for c in entry.metadata_captions])
                captions = several if variants else distinct([clean(entry.metadata_caption or "")])
            elif where == "filename" and entry.name:
                captions = distinct([filename_caption(entry.name) or ""])
            elif where == "captioner" and self.captioner_enabled:
                found = (None, "captioner")  # filled in by flush_captions
                break
            else:
                captions = []
            several_unused |= not variants and len(several) > 1
            if captions:
                found = (captions, where)
                break
        self.counts["variants_unused"] += several_unused
        return found

    def flush_bucket(self, bucket: tuple[int, int]) -> None:
        batch = self.pending.pop(bucket, [])
        if not batch:
            return
        latents = self.latents.encode([pixels for _, pixels in batch])
        for (key, _), latent in zip(batch, latents):
            self.counts["repaired"] += self.cache.latent_path(key).exists()  # there, but damaged
            self.cache.write_latent(key, latent.clone())
        self.counts["latents_encoded"] += len(batch)

    def flush_captions(self) -> None:
        if not self.to_caption:
            return
        if self.captioner is None:
            config = self.config
            self.captioner = Captioner(config.captioner, self.device, prompt=config.captioner_prompt, max_new_tokens=config.caption_max_new_tokens)
        captions = self.captioner.caption([pixels for _, pixels in self.to_caption])
        for (item, _), caption in zip(self.to_caption, captions):
            item.captions = [clean(caption)]
            with atomic_path(self.caption_path(item.caption_key)) as tmp:
                tmp.write_text(item.captions[0], encoding="utf-8")
        self.to_caption = []

    def finish_images(self) -> None:
        for bucket in list(self.pending):
            self.flush_bucket(bucket)
        self.flush_captions()
        self.index.save()
        if self.latents.loaded:
            self.models_loaded.append("vae")
        self.latents.close()
        if self.captioner is not None:
            self.models_loaded.append("captioner")
            self.captioner.close()
            self.captioner = None

    # pass 2: text ------------------------------------------------------------------
    def encode_texts(self) -> tuple[dict[str, str], str, list[dict[str, Any]]]:
        """(text key by final caption, key of the empty prompt, overlong captions); sets each item's final captions."""
        config = self.config
        dtype = self.config.text_torch_dtype(self.device)
        text = TextEncoder(config.model, self.device, dtype, config.text_8bit, config.max_tokens)
        self.text_fingerprint = component_fingerprint(config.model, "text_encoder")  # also recorded in the manifest
        fingerprint = content_key(self.text_fingerprint, component_fingerprint(config.model, "tokenizer"), str(dtype), f"8bit={models.text_encoder_in_8bit(config.text_8bit, self.device)}", str(config.max_tokens))
        # Composing can make two variants equal ("dog" and "sks, dog" under trigger sks): keep one.
        finals = {item.index: distinct([compose(c, config.trigger, config.prefix, config.suffix) for c in item.captions or [""]]) or [""] for item in self.accepted}
        unique = sorted({c for captions in finals.values() for c in captions} | {""})
        keys = {caption: content_key("text", caption, fingerprint) for caption in unique}
        overlong = []
        lengths: dict[str, int] = {}
        for start in range(0, len(unique), 256):
            chunk = unique[start : start + 256]
            lengths.update(zip(chunk, text.count_tokens(chunk)))
        for item in self.accepted:
            captions = finals[item.index]
            for variant, caption in enumerate(captions):
                if lengths[caption] > config.max_tokens:
                    where = {"variant": variant, "variants": len(captions)} if len(captions) > 1 else {}
                    overlong.append({"source": item.source, "tokens": lengths[caption], "limit": config.max_tokens, **where})
        todo = [c for c in unique if not self.cache.has_text(keys[c])]
        self.counts["texts_reused"] = len(unique) - len(todo)
        if todo:
            _ = text.pipe  # loads T5 (its own loading bar) before this bar starts, not in the middle of it
        bar = tqdm(total=len(todo), desc="encode captions (T5)", unit="caption", disable=not config.progress or not todo)
        for start in range(0, len(todo), config.text_batch_size):
            chunk = todo[start : start + config.text_batch_size]
            embeds, masks = text.encode(chunk)
            for caption, embed, mask in zip(chunk, embeds, masks):
                self.counts["repaired"] += self.cache.text_path(keys[caption]).exists()  # there, but damaged
                self.cache.write_text(keys[caption], embed.clone(), mask)
            self.counts["texts_encoded"] += len(chunk)
            bar.update(len(chunk))
        bar.close()
        if text.loaded:
            self.models_loaded.append("text_encoder")
        text.close()
        for item in self.accepted:
            item.captions = finals[item.index]
        return keys, keys[""], overlong


def prepare_dataset(config: PrepareConfig) -> dict[str, Any]:
    """Prepares ``config.source`` into ``config.out``; returns the report also written as report.json."""
    source, out = config.source, Path(config.out)
    if not config.progress:
        models.quiet_loading()
    check_out(source, out)
    if config.components:
        check_components(config.components)
    use_components(config.model, config.components)
    if config.max_tokens is None:
        config = dataclasses.replace(config, max_tokens=resolve_parts(config.model).family.max_tokens)
    with locked_out(out):
        return _prepare(config, source, out)


def _prepare(config: PrepareConfig, source: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    run = _Run(config)
    entries, total = open_source(source, config.source_kind, config.split, config.image_column, config.caption_column, run.unread, config.mask_column, run.ignored)
    for entry, outcome in tqdm(run.stage.run(entries), total=total, desc="read, check and encode images (VAE)", unit="image", disable=not config.progress):
        run.add(entry, outcome)
    run.finish_images()
    overlong: list[dict[str, Any]] = []
    # With nothing accepted there is nothing to train on: the report says why, and
    # neither T5 (gigabytes, for the empty prompt alone) nor a manifest is needed.
    if run.accepted:
        text_keys, empty_key, overlong = run.encode_texts()
        items = [CacheItem(a.source, tuple(a.captions), a.bucket, a.latent_key, tuple(text_keys[c] for c in a.captions), a.mask_key) for a in run.accepted]
        run.cache.write_manifest(
            Manifest(
                model=config.model,
                resolution=config.resolution,
                latent_channels=int(run.cache.read_latent(items[0].latent_key).shape[0]),
                caption_channels=int(run.cache.read_embeds(empty_key).shape[-1]),
                max_tokens=config.max_tokens,
                vae_scaling_factor=_vae_scaling_factor(config.model),
                empty_text_key=empty_key,
                items=items,
                text_encoder=run.text_fingerprint,
                components="" if resolve_parts(config.model).own_components else resolve_parts(config.model).components,
            )
        )
    seconds = time.perf_counter() - start
    seen = len(run.accepted) + len(run.skipped) + (0 if config.keep_duplicates else len(run.duplicates))
    report = {
        "source": str(source),
        "model": config.model,
        "resolution": config.resolution,
        "accepted": [
            {"source": a.source, "caption": a.captions[0], "captions": a.captions, "caption_from": a.caption_source, "bucket": list(a.bucket), "size": list(a.size),
             "mask": a.mask_name}
            for a in run.accepted
        ],
        "skipped": run.skipped,
        "unread": run.unread,
        "ignored": run.ignored,
        "masks": sum(a.mask_key is not None for a in run.accepted),
        "empty_masks": [a.source for a in run.accepted if a.mask_empty],
        "duplicates": run.duplicates,
        "overlong_captions": overlong,
        "buckets": {f"{h}x{w}": n for (h, w), n in sorted(Counter(a.bucket for a in run.accepted).items())},
        "caption_sources": dict(Counter(a.caption_source for a in run.accepted)),
        "counts": {
            "seen": seen,
            "accepted": len(run.accepted),
            "skipped": len(run.skipped),
            "unread": len(run.unread),
            "duplicates": len(run.duplicates),
            "latents_encoded": run.counts["latents_encoded"],
            "latents_reused": run.counts["latents_reused"],
            "texts_encoded": run.counts["texts_encoded"],
            "texts_reused": run.counts["texts_reused"],
            "captions": sum(len(a.captions) for a in run.accepted),
            "images_with_variants": sum(len(a.captions) > 1 for a in run.accepted),
            "images_with_unused_variants": run.counts["variants_unused"],
            "captions_generated": run.counts["captions_generated"],
            "captions_reused": run.counts["captions_reused"],
            "images_decoded": run.stage.decoded,
            "masks_encoded": run.counts["masks_encoded"],
            "masks_reused": run.counts["masks_reused"],
            "cache_entries_repaired": run.counts["repaired"],
        },
        "models_loaded": run.models_loaded,
        "seconds": round(seconds, 3),
        "images_per_second": round(seen / seconds, 2) if seconds > 0 else None,
        "config": dataclasses.asdict(config),
    }
    report = _printable(report)  # file names that are not UTF-8 cannot go into a UTF-8 report as they are
    with atomic_path(out / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def _vae_scaling_factor(model: str) -> float:
    """The VAE's scaling factor from its config.json, without loading its weights."""
    config = json.loads((resolve_component(model, "vae") / "config.json").read_text(encoding="utf-8"))
    return float(config.get("scaling_factor", 0.18215))
