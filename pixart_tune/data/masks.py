"""Per-image loss masks: where they come from, how they are checked, and how they become latent-sized weights.

A mask says where an image should train: white (255) is weight 1, black (0) is
weight 0, grey in between. It comes from a ``NAME.mask.png`` file beside the image
``NAME.EXT``, from a dataset column (``mask`` unless ``--mask-column`` names
another), or with ``--mask-from-alpha`` from the image's own alpha channel (a
mask file wins over alpha).

The mask is cut from exactly the region of the image that fills its bucket
(``buckets.bucket_region``: same bucket, same scale, same crop offsets, the
random crop's seed included), then averaged over the area of each latent cell
(8 x 8 bucket pixels): a cell's weight is the fraction of its pixels inside the
mask. Area averaging rather than the image's Lanczos: a mask is a weight, and
Lanczos rings past a hard edge into weights below 0 and above 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image

from pixart_tune.data.buckets import bucket_region
from pixart_tune.data.cache import content_key
from pixart_tune.data.images import DEFAULT_MAX_PIXELS, ImageSkip, load_gray

MASK_SUFFIX = ".mask.png"
LATENT_FACTOR = 8
"""Pixels per latent cell along each side (the SDXL VAE downsamples by 8)."""
AREA = "area/8"
"""How a mask is resampled, recorded in its cache key: a change of method must not reuse old masks."""


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """Where one image's mask comes from (a file or a dataset cell), read on a decode thread."""

    name: str
    """How messages name the mask: its file name, or the dataset column it is in."""
    read: Callable[[], bytes] | None
    skip: str | None = None
    """Why the mask cannot be read at all (a FIFO, a folder, a link outside the source); the image is then skipped."""


def is_mask_name(name: str) -> bool:
    """Whether a file name is a mask's (any letter case): such a file is never taken as a training image."""
    return name.lower().endswith(MASK_SUFFIX)


def mask_name_for(image_name: str) -> str:
    """``cat.jpg`` -> ``cat.mask.png``: the mask file that belongs beside an image."""
    stem = image_name.rsplit(".", 1)[0] if "." in image_name else image_name
    return stem + MASK_SUFFIX


def mask_source_for(image_source: str) -> str:
    """The report name (path relative to the source folder) of the mask of the image named ``image_source``."""
    path = PurePosixPath(image_source)
    return (path.parent / mask_name_for(path.name)).as_posix().removeprefix("./")


def orphan_reason() -> str:
    return f"a mask with no image beside it (the mask of NAME.jpg is NAME{MASK_SUFFIX}); not used"


def mask_failure(name: str, reason: str) -> str:
    """Why an image is skipped for its mask: the mask named, what is wrong, what to do."""
    return f"{name}: {reason}; fix or re-save the mask, or remove it to train this image unmasked"


def load_mask(data: bytes, name: str, image_name: str, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | ImageSkip:
    """The mask in ``data`` as upright 8-bit greyscale, checked against its image's upright ``size`` (height, width).

    An ``ImageSkip`` (for the image) says what is wrong with the mask and what to do.
    """
    loaded = load_gray(data, max_pixels)
    if isinstance(loaded, ImageSkip):
        return ImageSkip(mask_failure(name, loaded.reason))
    gray, _ = loaded
    if (gray.height, gray.width) != tuple(size):
        return ImageSkip(f"{name} is {gray.width}x{gray.height} but {image_name} is {size[1]}x{size[0]}: save the mask at the image's size")
    return gray


def mask_to_latent(gray: Image.Image, bucket: tuple[int, int], crop: str, seed: int) -> np.ndarray:
    """Weights [bucket h / 8, bucket w / 8] of a full-size upright mask: its bucket region, area-averaged per latent cell."""
    region = bucket_region((gray.height, gray.width), bucket, crop, seed)
    cells = (bucket[0] // LATENT_FACTOR, bucket[1] // LATENT_FACTOR)
    # clipped: float rounding in the table may put an all-white cell a hair above 1
    return np.clip(area_average(np.asarray(gray), region, cells) / 255.0, 0.0, 1.0).astype(np.float32)


def area_average(values: np.ndarray, region: tuple[float, float, float, float], cells: tuple[int, int]) -> np.ndarray:
    """The mean of ``values`` (a 2-D array of pixels) over each of ``cells`` (rows, columns) equal rectangles tiling ``region``.

    ``region`` (left, top, right, bottom) may cut pixels: a pixel counts with the
    part of its area inside a rectangle. Exact, through the integral image: the
    integral of a piecewise-constant image is bilinear inside each pixel, so
    interpolating the summed-area table bilinearly gives it at any point.
    """
    left, top, right, bottom = region
    # only the pixels the region touches
    x_lo, y_lo = int(np.floor(left)), int(np.floor(top))
    x_hi, y_hi = min(int(np.ceil(right)), values.shape[1]), min(int(np.ceil(bottom)), values.shape[0])
    part = values[y_lo:y_hi, x_lo:x_hi].astype(np.int64)
    table = np.zeros((part.shape[0] + 1, part.shape[1] + 1), np.float64)
    table[1:, 1:] = part.cumsum(0).cumsum(1)  # int64 sums are exact; float64 holds them exactly below 2**53
    ys = np.linspace(top - y_lo, bottom - y_lo, cells[0] + 1)
    xs = np.linspace(left - x_lo, right - x_lo, cells[1] + 1)
    integral = _interpolate(_interpolate(table, ys, axis=0), xs, axis=1)
    sums = np.diff(np.diff(integral, axis=0), axis=1)
    area = (bottom - top) / cells[0] * (right - left) / cells[1]
    return sums / area


def _interpolate(table: np.ndarray, points: np.ndarray, axis: int) -> np.ndarray:
    """``table`` linearly interpolated at fractional indices ``points`` along ``axis``."""
    points = np.clip(points, 0, table.shape[axis] - 1)
    low = np.minimum(np.floor(points).astype(np.int64), table.shape[axis] - 2)
    frac = points - low
    shape = [1, 1]
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(table, low, axis=axis) * (1 - frac) + np.take(table, low + 1, axis=axis) * frac


def mask_key(mask_hash: str, bucket: tuple[int, int], crop: str, seed: int) -> str:
    """Cache key of a mask's weights: its pixels and everything that places them (bucket, crop, and a random crop's seed)."""
    placed = f"{bucket[0]}x{bucket[1]}|{crop}|{seed if crop == 'random' else ''}|{AREA}"
    return content_key("mask", mask_hash, placed)
