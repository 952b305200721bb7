"""A held-out denoising loss that can be compared across steps and runs: the over-fitting signal.

The training loss is a poor guide to over-fitting: every step draws new noise and
new timesteps, so its value jumps by more than the drift being looked for, and it
is measured on images the adapter is fitted to. Here each held-out image is noised
at a fixed list of timesteps with noise that depends only on (seed, image, timestep),
so two evaluations differ only because the model did. A training loss that keeps
falling while this one turns up is over-fitting.

The held-out images are chosen by content (:func:`split_held_out`), so the same
images are held out whatever the order of the dataset and in every run. The
trainer supplies the model's loss (eval mode, no LoRA dropout, no caption dropout,
unweighted MSE: :func:`~pixart_tune.training.diffusion.per_sample_mse`) and switches modes around
:meth:`Evaluator.evaluate`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Protocol, Sequence

import torch

from pixart_tune.data.cache import CacheItem, Manifest, content_key
from pixart_tune.training.config import EvaluationSection
from pixart_tune.training.dataset import Batch, collate

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(latents, noise, timesteps, embeds, mask) -> per-sample loss [B]``."""


class EvaluationData(Protocol):
    """What :class:`Evaluator` reads: a prepared dataset (``CachedDataset`` is one)."""

    manifest: Manifest

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


# --- which images are held out ---------------------------------------------------------


def held_out_rank(latent_key: str) -> int:
    """A number fixed by an image's content alone: images are held out in this order.

    A salted hash, so the order has nothing to do with the file names or the
    dataset's order, and an image keeps its rank when others are added or removed.
    """
    return int(content_key("held-out", latent_key), 16)


def held_out_count(total: int, fraction: float) -> int:
    """How many of ``total`` images ``fraction`` holds out: at least one when any, never all.

    Raises naming ``data.eval_fraction`` when that would leave no image to train on
    (a one-image dataset, or a fraction near 1 on a small one).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or total == 0:
        return 0
    count = max(1, math.floor(fraction * total + 0.5))
    if count >= total:
        raise ValueError(
            f"data.eval_fraction={fraction:g} holds out {count} of the dataset's {total} image(s), leaving none to train on; "
            "lower data.eval_fraction, add images, or name a separate evaluation set with data.eval"
        )
    return count


def split_held_out(items: Sequence[CacheItem], fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of a manifest's items, both ascending.

    The held-out images are those of lowest :func:`held_out_rank`: the choice
    depends on the images' content, not on their order or the run, so every run on a
    dataset measures the same images and a resumed run holds out what it did.
    """
    count = held_out_count(len(items), fraction)
    by_rank = sorted(range(len(items)), key=lambda i: (held_out_rank(items[i].latent_key), i))
    held = sorted(by_rank[:count])
    chosen = set(held)
    return [i for i in range(len(items)) if i not in chosen], held


# --- fixed noise and timesteps -----------------------------------------------------------


def eval_noise(latent_key: str, shape: Sequence[int], seed: int, timestep: int) -> torch.Tensor:
    """The noise one image is noised with at one timestep, in fp32 on the CPU.

    Drawn from a CPU generator seeded by a hash of (seed, image, timestep): the same
    numbers on any device, in every run and at every step, and independent of the
    order the pairs are evaluated in or the batch they share.
    """
    generator_seed = int(content_key("eval-noise", str(seed), latent_key, str(timestep))[:16], 16) >> 1
    generator = torch.Generator(device="cpu").manual_seed(generator_seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """The distinct timesteps, in order; raises naming ``evaluation.timesteps`` for one outside the schedule.

    A timestep listed twice would be the same pair twice (same noise): once is enough.
    """
    outside = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if outside:
        raise ValueError(
            f"evaluation.timesteps {outside} lie outside this model's schedule of {num_train_timesteps} timesteps; "
            f"use timesteps from 0 to {num_train_timesteps - 1}"
        )
    return list(dict.fromkeys(int(t) for t in timesteps))


# --- the evaluation -------------------------------------------------------------------


def plan_pairs(buckets: Sequence[tuple[int, int]], indices: Sequence[int], timesteps: Sequence[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of (item index, timestep) pairs; each batch holds one bucket (one latent shape).

    Pairs are listed item by item, so an item's timesteps mostly share a batch and
    its files are read once there.
    """
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index in sorted(indices):
        groups.setdefault(tuple(buckets[index]), []).extend((index, t) for t in timesteps)
    return [pairs[i : i + batch_size] for _, pairs in sorted(groups.items()) for i in range(0, len(pairs), batch_size)]


class Evaluator:
    """The held-out loss of one set of images at fixed timesteps and noise."""

    def __init__(
        self,
        dataset: EvaluationData,
        indices: Sequence[int] | None,
        settings: EvaluationSection,
        num_train_timesteps: int,
        batch_size: int = 1,
    ):
        """``indices``: the held-out items of ``dataset`` (from :func:`split_held_out`),
        or None for all of them (``data.eval``, a separate prepared set).
        ``num_train_timesteps``: the noise scheduler's. ``batch_size``: pairs per
        forward pass; the training batch size fits, as no gradients are kept."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        items = dataset.manifest.items
        self.indices = list(range(len(items))) if indices is None else sorted(indices)
        if not self.indices:
            raise ValueError("the evaluation set is empty: set data.eval_fraction above 0 or name a prepared set with data.eval")
        if self.indices[0] < 0 or self.indices[-1] >= len(items):
            raise IndexError(f"held-out indices must lie in 0..{len(items) - 1}, got {self.indices[0]}..{self.indices[-1]}")
        self.dataset, self.settings = dataset, settings
        self.timesteps = check_timesteps(settings.timesteps, num_train_timesteps)
        self.batches = plan_pairs([item.bucket for item in items], self.indices, self.timesteps, batch_size)

    def __len__(self) -> int:
        """Pairs (image, timestep) one evaluation runs."""
        return len(self.indices) * len(self.timesteps)

    def inputs(self) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """(batch, noise, timesteps) of each planned batch, on the CPU; each item's first caption."""
        items = self.dataset.manifest.items
        for pairs in self.batches:
            read = {index: self.dataset[index] for index in dict.fromkeys(index for index, _ in pairs)}
            batch = collate([read[index] for index, _ in pairs])
            shape = batch.latents.shape[1:]
            noise = torch.stack([eval_noise(items[i].latent_key, shape, self.settings.seed, t) for i, t in pairs])
            yield batch, noise, torch.tensor([t for _, t in pairs], dtype=torch.long)

    @torch.no_grad()
    def evaluate(self, loss_fn: LossFn, device: torch.device | str, dtype: torch.dtype) -> dict[str, float]:
        """``{"eval/loss": mean over all pairs, "eval/loss_t<T>": mean at timestep T}``.

        ``loss_fn`` gets latents (fp32), noise (fp32), timesteps, text embeddings (in
        ``dtype``) and mask on ``device``, and returns the loss of each sample.
        """
        device = torch.device(device)
        sums = {t: 0.0 for t in self.timesteps}
        counts = {t: 0 for t in self.timesteps}
        for batch, noise, timesteps in self.inputs():
            batch = batch.to(device, dtype)
            losses = loss_fn(batch.latents, noise.to(device), timesteps.to(device), batch.embeds, batch.mask)
            if losses.shape != (len(batch),):
                raise ValueError(f"the evaluation loss must give one value per sample ({len(batch)}), got shape {list(losses.shape)}")
            for t, value in zip(timesteps.tolist(), losses.double().cpu().tolist()):
                sums[t] += value
                counts[t] += 1
        return summarize(sums, counts)


def summarize(sums: dict[int, float], counts: dict[int, int]) -> dict[str, float]:
    """The overall mean and the mean of each timestep, under the names the trackers log."""
    results = {"eval/loss": sum(sums.values()) / sum(counts.values())}
    results.update({f"eval/loss_t{t}": sums[t] / counts[t] for t in sums})
    return results
