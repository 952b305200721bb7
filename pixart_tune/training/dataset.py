"""Training batches from prepared feature caches: one aspect bucket per batch.

The dataset reads one item's latent and T5 embedding from disk at a time (the set
is never held in memory). Several prepared folders train together as one
:class:`TrainingSet`: their items concatenated, each listed its dataset's
``repeats`` times per epoch. The batch sampler groups item indices by bucket, so
all latents of a batch have one shape (datasets prepared at different resolutions
share a batch only where their buckets coincide), and orders the batches from
``seed`` and the epoch alone: the order is the same on every run, a resumed run
can skip to the batch it stopped at, and under DDP each rank takes distinct
batches, the same number on every rank. An item with several captions (caption
variants) is drawn as ``(index, variant)``, the variant chosen by the sampler from
the seed, the item and how often it was drawn before (:func:`choose_variant`), so
the caption is as reproducible as the order. The sampler lives in
:mod:`pixart_tune.training.sampler`.

Each sample carries its dataset's loss weight (prior preservation weighs class
images by it) and, where prepare cached one, its mask at latent resolution.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from pixart_tune.data.cache import FeatureCache, Manifest, content_key
from pixart_tune.errors import UserError
from pixart_tune.training.config import ExtraDataset
from pixart_tune.training.sampler import BucketBatchSampler, Draw, choose_variant

__all__ = ["Batch", "BucketBatchSampler", "CachedDataset", "Draw", "TrainingSet", "choose_variant", "collate", "dataset_fingerprint"]


@dataclasses.dataclass
class Batch:
    latents: torch.Tensor
    """[B, C, H/8, W/8], already scaled by the VAE scaling factor."""
    embeds: torch.Tensor
    """[B, T, D] T5 embeddings, T = the longest caption of the batch."""
    mask: torch.Tensor
    """[B, T] attention mask (1 = token, 0 = padding)."""
    weights: torch.Tensor | None = None
    """[B] loss weight of each sample (its dataset's loss_weight); None = all 1."""
    loss_masks: torch.Tensor | None = None
    """[B, 1, H/8, W/8] per-latent-pixel mask in [0, 1] (1 where an unmasked image
    is); None when no image of the batch has a mask."""

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """Text in the base model's dtype; latents, weights and masks stay fp32 for the loss math."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, torch.float32, non_blocking=True)

        return Batch(
            latents=self.latents.to(device, torch.float32, non_blocking=True),
            embeds=self.embeds.to(device, dtype, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            weights=move(self.weights),
            loss_masks=move(self.loss_masks),
        )

    def __len__(self) -> int:
        return self.latents.shape[0]

    def pin_memory(self) -> "Batch":
        def pin(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.pin_memory()

        return Batch(self.latents.pin_memory(), self.embeds.pin_memory(), self.mask.pin_memory(), pin(self.weights), pin(self.loss_masks))


class CachedDataset(Dataset):
    """Items of a prepared dataset folder: ``{"latent", "embeds"}``."""

    def __init__(self, root: str | Path, loss_weight: float = 1.0):
        self.cache = FeatureCache(root)
        self.loss_weight = loss_weight
        self.manifest: Manifest = self.cache.read_manifest()
        if not self.manifest.items:
            raise UserError(f"{root} holds no accepted images; add images and re-run 'pixart-tune prepare'")
        self.check_complete()
        self.check_shapes()
        self.empty_embeds, self.empty_mask = self.cache.read_text(self.manifest.empty_text_key, self.manifest.max_tokens)

    def check_complete(self) -> None:
        """Fails before training, not hours into it, when a cache file is missing."""
        missing = [
            path
            for item in self.manifest.items
            for path in (self.cache.latent_path(item.latent_key), *(self.cache.text_path(key) for key in item.text_keys), *self._mask_paths(item))
            if not path.is_file()
        ]
        if not self.cache.has_text(self.manifest.empty_text_key):
            missing.append(self.cache.text_path(self.manifest.empty_text_key))
        if missing:
            raise UserError(
                f"{len(missing)} cache file(s) of {self.cache.root} are missing (first: {missing[0]}); "
                "re-run 'pixart-tune prepare' with the same source and --out to fill them in"
            )

    def check_shapes(self) -> None:
        """Every latent has its bucket's shape: read from the file headers, before training starts.

        A latent that contradicts its bucket (a cache file swapped or copied in from
        another dataset) would otherwise fail mid-run in ``torch.stack``, or train on
        the wrong image where the shapes happen to agree.
        """
        from safetensors import safe_open

        channels = self.manifest.latent_channels
        for item in self.manifest.items:
            path = self.cache.latent_path(item.latent_key)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    shape = tuple(handle.get_slice("latent").get_shape())
            except Exception as error:  # safetensors raises its own error class for a damaged header
                raise UserError(
                    f"cache entry {path} is damaged ({' '.join(str(error).split()) or type(error).__name__}); "
                    "re-run 'pixart-tune prepare' on this dataset: it encodes damaged entries again"
                ) from None
            height, width = item.bucket
            # Channels against the model are check_fits_model's (it names the model); here the bucket's size.
            if len(shape) != 3 or shape[1:] != (height // 8, width // 8):
                raise UserError(
                    f"cache entry {path} ({item.source}) holds a latent of shape {list(shape)}, but its bucket {height}x{width} "
                    f"needs {[channels, height // 8, width // 8]}; the cache was changed after prepare: re-run 'pixart-tune prepare' "
                    "with the same source and --out"
                )

    def _mask_paths(self, item) -> tuple[Path, ...]:
        key = item.mask_key
        return (self.cache.mask_path(key),) if key else ()

    def subset(self, indices: Sequence[int]) -> "CachedDataset":
        """The same dataset with only the items at ``indices`` (a held-out split's other part)."""
        view = object.__new__(CachedDataset)
        view.__dict__.update(self.__dict__)
        view.manifest = dataclasses.replace(self.manifest, items=[self.manifest.items[i] for i in indices])
        return view

    @property
    def masked(self) -> int:
        """How many items have a mask."""
        return sum(bool(item.mask_key) for item in self.manifest.items)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(item.bucket) for item in self.manifest.items]

    @property
    def variants(self) -> list[int]:
        """Per item: how many captions it has."""
        return [len(item.text_keys) for item in self.manifest.items]

    def __len__(self) -> int:
        return len(self.manifest.items)

    def __getitem__(self, draw: Draw) -> dict[str, torch.Tensor]:
        """``latent`` [C, h, w], ``embeds`` [T, D] (the caption's T valid tokens only),
        ``weight`` (the dataset's loss weight) and, for a masked item, ``mask`` [1, h, w].

        ``draw`` is an index (its first caption) or ``(index, variant)``. The cache
        stores only the valid tokens; padding each item to ``max_tokens`` here (4.9 MB
        per fp32 item at T5-XXL width) would cost more time than reading it, only for
        :func:`collate` to cut most of it off again.
        """
        index, variant = draw if isinstance(draw, tuple) else (draw, 0)
        item = self.manifest.items[index]
        embeds = self.cache.read_embeds(item.text_keys[variant])[: self.manifest.max_tokens]
        sample = {"latent": self.cache.read_latent(item.latent_key), "embeds": embeds, "weight": torch.tensor(self.loss_weight)}
        mask_key = item.mask_key
        if mask_key:
            sample["mask"] = self.cache.read_mask(mask_key)
        return sample


class TrainingSet(Dataset):
    """Several prepared datasets as one: the main one first, then the extra ones.

    Index ``i`` runs over the concatenated items, each once; how often an item is
    trained per epoch is :attr:`repeats` ``[i]``, which the batch sampler applies.
    The empty-prompt embedding (caption dropout) is the main dataset's. ``sources``
    are datasets as the recipe lists them (``data.datasets()``) or (folder, repeats)
    pairs. With ``eval_fraction`` that share of the main dataset is held out
    (:func:`~pixart_tune.training.evaluation.split_held_out`): :attr:`eval_part` holds
    the whole main dataset and :attr:`held_out` the indices of it not trained on.
    """

    def __init__(self, sources: Sequence[ExtraDataset | tuple[str | Path, int]], eval_fraction: float = 0.0):
        if not sources:
            raise UserError("the recipe names no dataset: set data.path=FOLDER (a folder written by 'pixart-tune prepare')")
        self.specs = [spec if isinstance(spec, ExtraDataset) else ExtraDataset(Path(spec[0]), spec[1]) for spec in sources]
        self.parts = [CachedDataset(spec.path, spec.loss_weight) for spec in self.specs]
        self.eval_part: CachedDataset | None = None
        self.held_out: list[int] = []
        if eval_fraction:
            from pixart_tune.training.evaluation import split_held_out

            try:
                kept, self.held_out = split_held_out(self.parts[0].manifest.items, eval_fraction)
            except ValueError as error:
                raise UserError(f"{error} ({self.parts[0].cache.root} has {len(self.parts[0])} images)") from None
            self.eval_part = self.parts[0]
            self.parts[0] = self.parts[0].subset(kept)
        self.part_repeats = [spec.repeats for spec in self.specs]
        check_compatible(self.parts)
        self.offsets = list(itertools.accumulate((len(part) for part in self.parts), initial=0))

    @property
    def class_items(self) -> list[int]:
        """Indices of the prior-preservation (kind: class) dataset's items."""
        return [i for part, spec, start in zip(self.parts, self.specs, self.offsets) if spec.kind == "class" for i in range(start, start + len(part))]

    @property
    def class_ratio(self) -> float:
        return next((spec.ratio for spec in self.specs if spec.kind == "class"), 1.0)

    @property
    def main(self) -> CachedDataset:
        return self.parts[0]

    @property
    def empty_embeds(self) -> torch.Tensor:
        return self.main.empty_embeds

    @property
    def empty_mask(self) -> torch.Tensor:
        return self.main.empty_mask

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [bucket for part in self.parts for bucket in part.buckets]

    @property
    def repeats(self) -> list[int]:
        """Per item: times it appears in one epoch."""
        return [repeats for part, repeats in zip(self.parts, self.part_repeats) for _ in range(len(part))]

    @property
    def variants(self) -> list[int]:
        """Per item: how many captions it has (one, unless prepared with caption variants)."""
        return [count for part in self.parts for count in part.variants]

    @property
    def epoch_size(self) -> int:
        """Samples in one epoch (all ranks together, before ``drop_last``)."""
        others = sum(len(part) * spec.repeats for part, spec in zip(self.parts, self.specs) if spec.kind != "class")
        return others + (round(self.class_ratio * others) if self.class_items else 0)

    def describe(self) -> str:
        """One line per dataset: where, how many images, how often each, its weight and masks."""
        instance = sum(len(part) * spec.repeats for part, spec in zip(self.parts, self.specs) if spec.kind != "class")
        lines = []
        for part, spec in zip(self.parts, self.specs):
            if spec.kind == "class":
                share = f"class images, {round(spec.ratio * instance)} per epoch (ratio {spec.ratio:g})"
            else:
                share = f"x {spec.repeats} = {len(part) * spec.repeats}"
            extras = _several_captions(part.variants)
            extras += f", loss weight {spec.loss_weight:g}" if spec.loss_weight != 1 else ""
            extras += f", {part.masked} masked" if part.masked else ""
            lines.append(f"{part.cache.root}: {len(part)} images {share} ({part.manifest.resolution} px{extras})")
        if self.held_out:
            lines.append(f"{len(self.held_out)} image(s) of {self.parts[0].cache.root} held out for evaluation")
        return "; ".join(lines)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, draw: Draw) -> dict[str, torch.Tensor]:
        index, variant = draw if isinstance(draw, tuple) else (draw, 0)
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][(index - self.offsets[part], variant)]


def _several_captions(variants: list[int]) -> str:
    several = sum(count > 1 for count in variants)
    return f", {several} with several captions, {sum(variants)} captions in all" if several else ""


def check_compatible(parts: Sequence[CachedDataset]) -> None:
    """Refuses datasets whose features cannot be mixed with the main dataset's.

    Latents must come from one VAE space (channels, scaling factor) and text from
    one encoder: the empty-prompt key is a content key over the T5 weights,
    tokenizer and encoding settings, so equal keys mean the same text space.
    Resolution may differ (buckets keep shapes apart).
    """
    main = parts[0].manifest
    for part in parts[1:]:
        other = part.manifest
        problems = [
            f"{what}: {mine} vs {theirs}"
            for what, mine, theirs in (
                ("latent channels", main.latent_channels, other.latent_channels),
                ("caption channels", main.caption_channels, other.caption_channels),
                ("VAE scaling factor", main.vae_scaling_factor, other.vae_scaling_factor),
                ("max tokens", main.max_tokens, other.max_tokens),
            )
            if mine != theirs
        ]
        if main.empty_text_key != other.empty_text_key:
            problems.append("text encoder: the empty prompt encodes differently (another T5, tokenizer, or T5 dtype / 8-bit setting)")
        if problems:
            raise UserError(
                f"dataset {part.cache.root} does not fit the main dataset {parts[0].cache.root} "
                f"({'; '.join(problems)}); they were prepared with {other.model} and {main.model}: "
                f"re-run 'pixart-tune prepare' on {part.cache.root}'s images with the --model (and text settings) of the main dataset"
            )


def collate(items: Sequence[dict[str, torch.Tensor]]) -> Batch:
    """Stacks one bucket's items; pads the text to the longest caption of the batch.

    Padding tokens are masked out of cross-attention (their weight is exactly zero
    after the softmax), so stopping at the longest caption instead of the model's
    300 tokens changes no result and saves most of the cross-attention work for
    short captions.
    """
    length = max(1, *(item["embeds"].shape[0] for item in items))
    first = items[0]["embeds"]
    embeds = first.new_zeros(len(items), length, first.shape[-1])
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for i, item in enumerate(items):
        valid = item["embeds"].shape[0]
        embeds[i, :valid] = item["embeds"]
        mask[i, :valid] = 1
    latents = torch.stack([item["latent"] for item in items])
    weights = torch.stack([item["weight"] for item in items]).float() if "weight" in items[0] else None
    loss_masks = None
    if any("mask" in item for item in items):
        # An unmasked image of a batch with masked ones weighs every pixel 1.
        ones = torch.ones((1, *latents.shape[2:]))
        loss_masks = torch.stack([item.get("mask", ones).float() for item in items])
    return Batch(latents=latents, embeds=embeds, mask=mask, weights=weights, loss_masks=loss_masks)


def dataset_fingerprint(dataset: TrainingSet) -> str:
    """A hash of what was trained on: every dataset's cache keys and its repeats.

    One dataset at repeats 1 keeps the single-dataset value (same images + captions
    + encoders give the same fingerprint); otherwise the datasets' own fingerprints
    and repeats, in order, are hashed together. An item's entry lists every caption
    variant's key in order; with one caption it is what it was before variants.
    """
    parts = []
    for part, spec in zip(dataset.parts, dataset.specs):
        manifest = part.manifest
        # A mask changes what is trained: its key joins the item's (absent: as before masks).
        keys = sorted(":".join((i.latent_key, *i.text_keys, *filter(None, [i.mask_key]))) for i in manifest.items)
        share = f"x{spec.repeats}" if spec.kind != "class" else f"class{spec.ratio:g}"
        weight = f"w{spec.loss_weight:g}" if spec.loss_weight != 1 else ""
        parts.append((content_key(*keys, manifest.empty_text_key), share + weight))
    if len(parts) == 1 and parts[0][1] == "x1":
        return parts[0][0]
    return content_key("datasets", *(f"{key}{share}" for key, share in parts))


def model_vae_scaling_factor(model: str) -> float | None:
    """The scaling factor of ``model``'s VAE (read as prepare reads it), or None where its VAE config is not at hand."""
    from pixart_tune.data.prepare import _vae_scaling_factor

    try:
        return _vae_scaling_factor(model)
    except (UserError, OSError, ValueError):
        return None


def model_text_fingerprint(model: str) -> str | None:
    """The fingerprint of ``model``'s T5 as prepare records it, or None where its weights are not on this machine.

    Never downloads: a hub model's T5 is looked for in the local cache only (training
    on cached embeddings needs no T5, and it is gigabytes).
    """
    from pixart_tune.encoders import component_fingerprint
    from pixart_tune.parts import resolve_parts

    model = resolve_parts(model).components
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, allow_patterns=["text_encoder/*"], local_files_only=True))
        except Exception:  # not cached, or not a hub id: nothing to compare
            return None
    if not (folder / "text_encoder").is_dir():
        return None
    return component_fingerprint(str(folder), "text_encoder")


def check_fits_model(
    transformer_config, manifest: Manifest, data_path, vae_scaling_factor: float | None = None, text_fingerprint: str | None = None
) -> None:
    """Refuses a dataset whose features were made for another model: its shapes, another VAE's latent scale, another T5.

    Two VAEs with the same channel count (PixArt-alpha's SD VAE at 0.18215, Sigma's
    SDXL VAE at 0.13025) make latents of one shape but another scale, and two T5s of
    one width make embeddings of one shape but other meaning: training on them would
    run and learn the wrong thing.
    """
    problems = []
    if vae_scaling_factor is not None and abs(manifest.vae_scaling_factor - vae_scaling_factor) > 1e-6:
        problems.append(
            f"its latents were scaled by {manifest.vae_scaling_factor:g} (another VAE), this model's VAE scales by {vae_scaling_factor:g}"
        )
    if manifest.text_encoder and text_fingerprint and manifest.text_encoder != text_fingerprint:
        problems.append("its text embeddings were made by another T5 (its weights differ from this model's text_encoder/)")
    if manifest.latent_channels != transformer_config.in_channels:
        problems.append(f"latents have {manifest.latent_channels} channels, the transformer takes {transformer_config.in_channels}")
    if manifest.caption_channels != transformer_config.caption_channels:
        problems.append(f"text embeddings have {manifest.caption_channels} channels, the transformer takes {transformer_config.caption_channels}")
    if problems:
        raise UserError(
            f"dataset {data_path} does not fit this model ({'; '.join(problems)}); it was prepared with {manifest.model}: "
            "re-run 'pixart-tune prepare' with --model set to the model you train"
        )
