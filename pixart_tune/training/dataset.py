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
the caption is as reproducible as the order.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch.utils.data import Dataset, Sampler

from pixart_tune.data.cache import FeatureCache, Manifest, content_key
from pixart_tune.errors import UserError

# What a batch sampler yields per sample: an item index, or (index, caption variant)
# for an item with several captions.
Draw = Union[int, tuple[int, int]]


@dataclasses.dataclass
class Batch:
    latents: torch.Tensor
    """[B, C, H/8, W/8], already scaled by the VAE scaling factor."""
    embeds: torch.Tensor
    """[B, T, D] T5 embeddings, T = the longest caption of the batch."""
    mask: torch.Tensor
    """[B, T] attention mask (1 = token, 0 = padding)."""

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """Text in the base model's dtype; latents stay fp32 for the noising math."""
        return Batch(
            latents=self.latents.to(device, torch.float32, non_blocking=True),
            embeds=self.embeds.to(device, dtype, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return self.latents.shape[0]

    def pin_memory(self) -> "Batch":
        return Batch(self.latents.pin_memory(), self.embeds.pin_memory(), self.mask.pin_memory())


class CachedDataset(Dataset):
    """Items of a prepared dataset folder: ``{"latent", "embeds"}``."""

    def __init__(self, root: str | Path):
        self.cache = FeatureCache(root)
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
            for path in (self.cache.latent_path(item.latent_key), *(self.cache.text_path(key) for key in item.text_keys))
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
        """``latent`` [C, h, w] and ``embeds`` [T, D]: the caption's T valid tokens only.

        ``draw`` is an index (its first caption) or ``(index, variant)``. The cache
        stores only the valid tokens; padding each item to ``max_tokens`` here (4.9 MB
        per fp32 item at T5-XXL width) would cost more time than reading it, only for
        :func:`collate` to cut most of it off again.
        """
        index, variant = draw if isinstance(draw, tuple) else (draw, 0)
        item = self.manifest.items[index]
        embeds = self.cache.read_embeds(item.text_keys[variant])[: self.manifest.max_tokens]
        return {"latent": self.cache.read_latent(item.latent_key), "embeds": embeds}


class TrainingSet(Dataset):
    """Several prepared datasets as one: the main one first, then the extra ones.

    Index ``i`` runs over the concatenated items, each once; how often an item is
    trained per epoch is :attr:`repeats` ``[i]``, which the batch sampler applies.
    The empty-prompt embedding (caption dropout) is the main dataset's.
    """

    def __init__(self, sources: Sequence[tuple[str | Path, int]]):
        if not sources:
            raise UserError("the recipe names no dataset: set data.path=FOLDER (a folder written by 'pixart-tune prepare')")
        self.parts = [CachedDataset(path) for path, _ in sources]
        self.part_repeats = [repeats for _, repeats in sources]
        check_compatible(self.parts)
        self.offsets = list(itertools.accumulate((len(part) for part in self.parts), initial=0))

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
        return sum(len(part) * repeats for part, repeats in zip(self.parts, self.part_repeats))

    def describe(self) -> str:
        """One line per dataset: where, how many images, how often each."""
        return "; ".join(
            f"{part.cache.root}: {len(part)} images x {repeats} = {len(part) * repeats} "
            f"({part.manifest.resolution} px{_several_captions(part.variants)})"
            for part, repeats in zip(self.parts, self.part_repeats)
        )

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
    return Batch(latents=torch.stack([item["latent"] for item in items]), embeds=embeds, mask=mask)


def choose_variant(seed: int, index: int, draw: int, count: int) -> int:
    """Which of item ``index``'s ``count`` captions its ``draw``-th draw of the run uses (draws counted from 0).

    Draws go in rounds of ``count``: each round uses every caption once, in an order
    shuffled from (seed, item, round). So captions take turns evenly (a random pick
    could leave one unseen for many epochs), the order is not the same every round,
    and it depends on nothing but its arguments: not on the process, the rank, or
    where a run was resumed.
    """
    if count == 1:
        return 0
    round_, position = divmod(draw, count)
    order = list(range(count))
    random.Random(f"caption:{seed}:{index}:{round_}").shuffle(order)
    return order[position]


class BucketBatchSampler(Sampler[list[Draw]]):
    """Batches of indices that share a bucket, in an order fixed by seed and epoch.

    ``repeats[i]`` (default 1) lists index ``i`` that many times per epoch; the
    copies are shuffled within their bucket like any other item, so they spread
    over the epoch (two copies can meet in one batch, as in kohya's repeats). Call
    :meth:`set_epoch` before iterating; ``start`` skips the batches a resumed run
    has already trained on. With ``num_replicas`` > 1 the epoch's batches are dealt
    round-robin to the ranks after trimming (or cycling, for tiny sets) to a
    multiple of the rank count, so every rank runs the same number of steps.

    ``variants[i]`` (default 1) is how many captions item ``i`` has. An item with
    several is yielded as ``(i, variant)``: its k-th copy in the epoch's order is its
    draw ``epoch * repeats[i] + k`` of the run, and :func:`choose_variant` maps that
    draw to a caption. The choice is made on the whole epoch before it is dealt to
    the ranks, so ranks agree and a resumed run skips to the same captions; it
    draws nothing from the order's generator, so the batches stay those of the same
    data without variants, and items with one caption are yielded as plain indices,
    exactly as before.
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: Sequence[int] | None = None,
        variants: Sequence[int] | None = None,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if repeats is not None and len(repeats) != len(buckets):
            raise ValueError(f"{len(repeats)} repeats for {len(buckets)} items")
        if variants is not None and (len(variants) != len(buckets) or min(variants, default=1) < 1):
            raise ValueError(f"variants must give each of the {len(buckets)} items at least one caption, got {list(variants)}")
        self.repeats = list(repeats) if repeats is not None else [1] * len(buckets)
        self.variants = list(variants) if variants is not None and max(variants, default=1) > 1 else None
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            # With every repeat 1 this is the single-dataset order, so a recipe
            # without extra datasets keeps its batches.
            self.groups.setdefault(tuple(bucket), []).extend([index] * (repeats[index] if repeats else 1))
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0
        if not self.epoch_batches(0):
            raise UserError(
                f"no bucket holds {batch_size} images, so drop_last leaves no batch; lower data.batch_size "
                "or set data.drop_last=false"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_batches(self, epoch: int) -> list[list[Draw]]:
        """All ranks' batches of ``epoch``, in training order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            rng.shuffle(indices)
            for i in range(0, len(indices), self.batch_size):
                batch = indices[i : i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches if self.variants is None else self._with_variants(batches, epoch)

    def _with_variants(self, batches: list[list[int]], epoch: int) -> list[list[Draw]]:
        """The epoch's batches with each copy of a several-caption item as ``(index, variant)``."""
        copies: dict[int, int] = {}
        chosen = []
        for batch in batches:
            draws: list[Draw] = []
            for index in batch:
                count = self.variants[index]
                if count > 1:
                    copy = copies[index] = copies.get(index, -1) + 1
                    draws.append((index, choose_variant(self.seed, index, epoch * self.repeats[index] + copy, count)))
                else:
                    draws.append(index)
            chosen.append(draws)
        return chosen

    def rank_batches(self, epoch: int) -> list[list[Draw]]:
        batches = self.epoch_batches(epoch)
        world = self.num_replicas
        if world > 1:
            if len(batches) < world:
                batches = [batches[i % len(batches)] for i in range(world)]
            batches = batches[: len(batches) - len(batches) % world]
        return batches[self.rank :: world]

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[Draw]]:
        yield from self.rank_batches(self.epoch)[self.start :]


def dataset_fingerprint(dataset: TrainingSet) -> str:
    """A hash of what was trained on: every dataset's cache keys and its repeats.

    One dataset at repeats 1 keeps the single-dataset value (same images + captions
    + encoders give the same fingerprint); otherwise the datasets' own fingerprints
    and repeats, in order, are hashed together. An item's entry lists every caption
    variant's key in order; with one caption it is what it was before variants.
    """
    parts = []
    for part, repeats in zip(dataset.parts, dataset.part_repeats):
        manifest = part.manifest
        keys = sorted(":".join((i.latent_key, *i.text_keys)) for i in manifest.items)
        parts.append((content_key(*keys, manifest.empty_text_key), repeats))
    if len(parts) == 1 and parts[0][1] == 1:
        return parts[0][0]
    return content_key("datasets", *(f"{key}x{repeats}" for key, repeats in parts))


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
