"""The order of training samples: aspect-bucket batches fixed by the seed and the epoch.

Every batch holds one bucket's items (one latent shape). The order depends on
nothing but the seed, the epoch and the datasets, so a resumed run skips to the
batch it stopped at and the ranks of a DDP run take distinct batches, the same
number each. Items with several captions take turns through them
(:func:`choose_variant`), and a prior-preservation (``kind: class``) dataset is
drawn at a ratio to the other samples, cycling through its images across epochs
(:func:`class_draw`).
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence, Union

from torch.utils.data import Sampler

from pixart_tune.errors import UserError

# What a batch sampler yields per sample: an item index, or (index, caption variant)
# for an item with several captions.
Draw = Union[int, tuple[int, int]]


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
        class_items: Sequence[int] = (),
        class_ratio: float = 1.0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if repeats is not None and len(repeats) != len(buckets):
            raise ValueError(f"{len(repeats)} repeats for {len(buckets)} items")
        if variants is not None and (len(variants) != len(buckets) or min(variants, default=1) < 1):
            raise ValueError(f"variants must give each of the {len(buckets)} items at least one caption, got {list(variants)}")
        self.repeats = list(repeats) if repeats is not None else [1] * len(buckets)
        self.variants = list(variants) if variants is not None and max(variants, default=1) > 1 else None
        self.buckets = [tuple(bucket) for bucket in buckets]
        self.class_items = list(class_items)
        skip = set(self.class_items)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            # With every repeat 1 this is the single-dataset order, so a recipe
            # without extra datasets keeps its batches.
            if index not in skip:
                self.groups.setdefault(bucket, []).extend([index] * self.repeats[index])
        # kohya's balance at ratio 1: as many class samples per epoch as all others together.
        self.class_per_epoch = round(class_ratio * sum(map(len, self.groups.values()))) if self.class_items else 0
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

    def class_draws(self, epoch: int) -> dict[tuple[int, int], list[Draw]]:
        """The class samples of ``epoch`` by bucket, in drawing order."""
        drawn: dict[tuple[int, int], list[Draw]] = {}
        for number in range(epoch * self.class_per_epoch, (epoch + 1) * self.class_per_epoch):
            index, round_ = class_draw(self.seed, self.class_items, number)
            count = self.variants[index] if self.variants is not None else 1
            # Each round draws every class image once, so the round is the image's draw number.
            draw = (index, choose_variant(self.seed, index, round_, count)) if count > 1 else index
            drawn.setdefault(self.buckets[index], []).append(draw)
        return drawn

    def epoch_batches(self, epoch: int) -> list[list[Draw]]:
        """All ranks' batches of ``epoch``, in training order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        drawn = self.class_draws(epoch) if self.class_per_epoch else {}
        for bucket in sorted(set(self.groups) | set(drawn)):
            indices = list(self.groups.get(bucket, ()))
            rng.shuffle(indices)  # an empty list draws nothing: the order without class images is kept
            if bucket in drawn:
                indices = interleave(indices, drawn[bucket])
            for i in range(0, len(indices), self.batch_size):
                batch = indices[i : i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches if self.variants is None else self._with_variants(batches, epoch)

    def _with_variants(self, batches: list[list[Draw]], epoch: int) -> list[list[Draw]]:
        """The epoch's batches with each copy of a several-caption item as ``(index, variant)``."""
        copies: dict[int, int] = {}
        chosen = []
        for batch in batches:
            draws: list[Draw] = []
            for index in batch:
                if isinstance(index, tuple):  # a class draw, its caption already chosen
                    draws.append(index)
                    continue
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


def class_draw(seed: int, class_items: Sequence[int], number: int) -> tuple[int, int]:
    """The item of a class dataset's ``number``-th draw of the run, and the round it falls in.

    Draws go in rounds over the whole class set, each round in its own order from
    (seed, round): every class image is used once before any is used again, however
    the rounds fall across epochs (a class set larger than an epoch's share is still
    seen in full over the run).
    """
    round_, position = divmod(number, len(class_items))
    order = list(class_items)
    random.Random(f"class:{seed}:{round_}").shuffle(order)
    return order[position], round_


def interleave(first: Sequence[Draw], second: Sequence[Draw]) -> list[Draw]:
    """Both lists merged in order with each spread evenly over the result.

    Each element sits at its fractional position in its own list; batches cut from
    the merge then hold the two kinds in their overall proportion (a class image
    next to every subject image at ratio 1), not one kind's run after the other's.
    """
    keyed = [((i + 0.5) / len(first), 0, i) for i in range(len(first))] + [((j + 0.5) / len(second), 1, j) for j in range(len(second))]
    return [first[i] if kind == 0 else second[i] for _, kind, i in sorted(keyed)]
