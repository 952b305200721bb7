"""The image stage of prepare: read, decode, validate, bucket and crop each image, on threads, in scan order.

Threads rather than processes: Pillow decodes, converts and resizes in C with
the GIL released, and hashlib releases it on large buffers, so threads decode in
parallel as processes would, without pickling pixels across a pipe and without a
second copy of torch in memory. At most ``2 x workers`` images are in flight and
results come back in scan order, so reports are reproducible and memory stays
flat however many images there are.

Work is skipped wherever the result is already known: a file whose bytes the
scan index has seen is not decoded again unless its crop is wanted (its latent
is not cached yet); a JPEG bigger than its bucket needs is decoded reduced; a
crop is made only when wanted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

from pixart_tune.data.buckets import cover_scale, nearest_bucket, resize_to_bucket
from pixart_tune.data.images import ImageSkip, LoadedImage, load_image, pixel_hash as hash_pixels
from pixart_tune.data.masks import load_mask, mask_failure, mask_to_latent
from pixart_tune.data.scanindex import ScanIndex
from pixart_tune.data.sources import Entry
from pixart_tune.fsutil import NotRegularFile, os_error_text

MAX_AUTO_WORKERS = 8
"""More decode threads rarely help: past this the VAE or the disk is the bottleneck, and each holds an image."""

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    resolution: int
    """Bucket table (256, 512, 1024 or 2048)."""
    max_upscale: float = 2.0
    max_pixels: int = Image.MAX_IMAGE_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    crop: str = "center"
    reduce: bool = True
    """Decode JPEGs bigger than their bucket needs reduced (DCT scaling)."""
    mask_from_alpha: bool = False
    """An image without a mask file takes its alpha channel as its loss mask."""

    def decode_key(self) -> str:
        """What decoding depends on (``max_upscale`` and ``crop`` act after it)."""
        return f"resolution={self.resolution}|max_pixels={self.max_pixels}|background={self.background}"


@dataclasses.dataclass
class Bucketed:
    """An image that passed every check, with its bucket and (when wanted) its crop."""

    size: tuple[int, int]
    """(height, width) of the full upright image."""
    bucket: tuple[int, int]
    pixel_hash: str
    """Hash of the decoded pixels (reduced ``scale`` times): what the crop is made from."""
    scale: int = 1
    full_hash: str | None = None
    """Hash of the full-size pixels, when known (always when ``scale`` is 1)."""
    pixels: Image.Image | None = None
    """The image resized to cover its bucket and cropped to it, when it was wanted."""
    index_key: str | None = None
    alpha_hash: str | None = None
    """Hash of the image's alpha channel, when it has real transparency."""
    mask_name: str | None = None
    """How messages name the image's loss mask (a file, a dataset column, its alpha channel); None: no mask."""
    mask_hash: str | None = None
    """Hash of the mask's greyscale pixels: with the bucket and crop, what its cache entry is keyed by."""
    mask: np.ndarray | None = None
    """The mask's weights at latent resolution (``masks.mask_to_latent``), when they were wanted."""

    @property
    def crop_seed(self) -> int:
        """Seed of the random crop: from the content, so the same image gets the same crop every run."""
        return int(self.pixel_hash[:8], 16)


Outcome = Bucketed | ImageSkip


def read_failure(error: OSError) -> str:
    """Why an image found by the scan could not be read, as the report says it."""
    if isinstance(error, FileNotFoundError):
        return "vanished after the scan (deleted or moved while prepare ran)"
    if isinstance(error, NotRegularFile):
        return f"{error}: not read (it was replaced after the scan)"
    return f"cannot read the file ({os_error_text(error)}); fix its permissions and re-run"


def resolve_workers(workers: int) -> int:
    """Decode threads for ``workers`` (0: one per CPU core this process may use, at most ``MAX_AUTO_WORKERS``)."""
    if workers > 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_WORKERS))


def needed_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The smallest (height, width) an image of this upright size can be decoded at and still cover its bucket."""
    bucket = nearest_bucket(height, width, resolution)
    scale = cover_scale((height, width), bucket)
    return math.ceil(height * scale), math.ceil(width * scale)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, in_flight: int | None = None) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in the order of ``items``, computed on ``workers`` threads with at most ``in_flight`` pending.

    ``Executor.map`` would submit every item at once (Python < 3.14): unbounded memory on a large folder.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    in_flight = in_flight or 2 * workers
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare-decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= in_flight:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


class ImageStage:
    """Turns source entries into ``Bucketed`` images or ``ImageSkip`` reasons.

    ``wants_pixels(bucketed)`` says whether the crop of an image is needed (its
    latent is not cached yet), ``wants_mask(bucketed)`` whether its mask's weights
    are (``mask_hash`` set); both are called from the decode threads.
    """

    def __init__(
        self, settings: StageSettings, workers: int = 0, index: ScanIndex | None = None, wants_pixels: Callable[[Bucketed], bool] | None = None,
        wants_mask: Callable[[Bucketed], bool] | None = None,
    ):
        self.settings = settings
        self.workers = resolve_workers(workers)
        self.index = index
        self.wants_pixels = wants_pixels or (lambda _: True)
        self.wants_mask = wants_mask or (lambda _: True)
        self.decoded = 0
        """Images decoded so far (the others were known from the scan index)."""

    def run(self, entries: Iterable[Entry]) -> Iterator[tuple[Entry, Outcome]]:
        """Every entry with its outcome, in the order given; what was decoded goes into the index."""
        for entry, (outcome, learned) in ordered_map(self._process, entries, self.workers):
            if learned is not None:
                key, value, decoded = learned
                self.decoded += decoded
                if key is not None and self.index is not None:
                    self.index.put(key, value)
            yield entry, outcome

    def process(self, entry: Entry, force_pixels: bool = False) -> Outcome:
        """One entry, decoded again if its crop is wanted (or ``force_pixels``)."""
        outcome, learned = self._process(entry, force_pixels)
        self.decoded += bool(learned and learned[2])
        return outcome

    def _process(self, entry: Entry, force_pixels: bool = False) -> tuple[Outcome, tuple[str | None, dict[str, Any], bool] | None]:
        """(outcome, (index key, what the index learns, whether the file was decoded)); runs on a decode thread."""
        if entry.skip:
            return ImageSkip(entry.skip), None
        try:
            data = entry.read()
        except OSError as error:
            return ImageSkip(read_failure(error)), None
        reduce = self.settings.reduce and entry.rereadable
        key = self.index.key(data, reduce) if self.index is not None else None
        known = self.index.get(key) if key is not None else None
        if known is not None:
            if "skip" in known:
                return ImageSkip(known["skip"]), (key, known, False)
            outcome = self._bucket(tuple(known["size"]), known["hash"], known["scale"], known.get("full"), key, known.get("alpha"))
            if isinstance(outcome, ImageSkip):
                return outcome, (key, known, False)
            # A duplicate's latent is never made (unless duplicates are kept): do not decode it for nothing.
            # The hint is only a hint: whoever finds the crop missing asks again with force_pixels.
            wanted = force_pixels or (not known.get("duplicate") and (self.wants_pixels(outcome) or self._alpha_mask_wanted(entry, outcome)))
            # an index entry older than alpha masks does not say whether the image has alpha
            if not wanted and not (self._uses_alpha(entry) and "alpha" not in known):
                return self._with_mask(entry, outcome, None, force_pixels), (key, known, False)
        needed = (lambda h, w: needed_size(h, w, self.settings.resolution)) if reduce else None
        loaded = load_image(data, self.settings.max_pixels, self.settings.background, needed)
        del data
        if isinstance(loaded, ImageSkip):
            return loaded, (key, {"skip": loaded.reason}, True)
        full_hash = loaded.full_hash or (known or {}).get("full")  # a full-size hash an earlier run took
        alpha_hash = loaded.alpha_hash
        learned = {"size": list(loaded.size), "hash": loaded.pixel_hash, "scale": loaded.scale, "full": full_hash,
                   "duplicate": bool((known or {}).get("duplicate")), "alpha": alpha_hash}
        outcome = self._bucket(loaded.size, loaded.pixel_hash, loaded.scale, full_hash, key, alpha_hash)
        if isinstance(outcome, Bucketed) and (force_pixels or self.wants_pixels(outcome)):
            outcome.pixels = resize_to_bucket(loaded.image, outcome.bucket, self.settings.crop, outcome.crop_seed, loaded.size, loaded.scale)
        if isinstance(outcome, Bucketed):
            outcome = self._with_mask(entry, outcome, loaded.alpha, force_pixels)
        return outcome, (key, learned, True)

    def _uses_alpha(self, entry: Entry) -> bool:
        """Whether the entry's mask, if any, is its alpha channel: asked for, and no mask file or column wins over it."""
        return self.settings.mask_from_alpha and entry.mask is None

    def _alpha_mask_wanted(self, entry: Entry, outcome: Bucketed) -> bool:
        """Whether an image must be decoded for its alpha mask (the mask's weights are not cached)."""
        if not self._uses_alpha(entry) or outcome.alpha_hash is None:
            return False
        return self.wants_mask(dataclasses.replace(outcome, mask_hash=outcome.alpha_hash))

    def _with_mask(self, entry: Entry, outcome: Bucketed, alpha: Image.Image | None, force: bool) -> Outcome:
        """``outcome`` with its loss mask found, checked and (when wanted) made; or why the image cannot be used.

        ``alpha``: the decoded alpha channel, None when the image was not decoded (its
        hash from the index still keys the mask; whoever needs the weights asks again with ``force``).
        """
        if entry.mask is not None:
            gray = self._read_mask(entry, outcome)
            if isinstance(gray, ImageSkip):
                return gray
            outcome.mask_name, outcome.mask_hash = entry.mask.name, hash_pixels(gray)
        elif self._uses_alpha(entry) and outcome.alpha_hash is not None:
            gray = alpha
            outcome.mask_name, outcome.mask_hash = "alpha channel", outcome.alpha_hash
        else:
            return outcome
        if gray is not None and (force or self.wants_mask(outcome)):
            outcome.mask = mask_to_latent(gray, outcome.bucket, self.settings.crop, outcome.crop_seed)
        return outcome

    def _read_mask(self, entry: Entry, outcome: Bucketed) -> Image.Image | ImageSkip:
        """The entry's mask file or cell, decoded and checked against its image's size."""
        mask = entry.mask
        if mask.skip or mask.read is None:
            return ImageSkip(mask_failure(mask.name, mask.skip or "no data"))
        try:
            data = mask.read()
        except OSError as error:
            return ImageSkip(f"{mask.name}: {read_failure(error)}")  # the reason says what to do
        return load_mask(data, mask.name, entry.name or "the image", outcome.size, self.settings.max_pixels)

    def _bucket(self, size: tuple[int, int], pixel_hash: str, scale: int, full_hash: str | None, key: str | None, alpha_hash: str | None = None) -> Outcome:
        settings = self.settings
        bucket = nearest_bucket(*size, settings.resolution)
        upscale = cover_scale(size, bucket)
        if upscale > settings.max_upscale:
            return ImageSkip(
                f"too small: {size[1]}x{size[0]} px would need {upscale:.1f}x upscaling to cover its "
                f"{bucket[1]}x{bucket[0]} bucket at resolution {settings.resolution} (limit --max-upscale {settings.max_upscale:g})"
            )
        return Bucketed(tuple(size), bucket, pixel_hash, scale, full_hash, index_key=key, alpha_hash=alpha_hash)

    def full_hash(self, entry: Entry) -> str:
        """The hash of ``entry``'s full-size pixels, decoding it again (for duplicate checks)."""
        self.decoded += 1
        try:
            loaded = load_image(entry.read(), self.settings.max_pixels, self.settings.background)
        except OSError:
            loaded = None
        if not isinstance(loaded, LoadedImage):
            return f"unreadable:{entry.source}"  # changed under us: equal to nothing
        return loaded.pixel_hash
