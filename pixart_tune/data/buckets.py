"""Aspect-ratio buckets exactly as PixArt-Sigma generates, and the resize-and-crop into one.

The tables (:func:`pixart_tune.base.bucket_table`) are diffusers' own, so training
sees the very sizes the pipeline's resolution binning produces at inference. The
bucket of an image is the table entry whose aspect-ratio key (height / width) is
nearest to the image's, which is also the rule
``PixArtImageProcessor.classify_height_width_bin`` applies when generating.
"""

from __future__ import annotations

import math

from diffusers.image_processor import PixArtImageProcessor
from PIL import Image

from pixart_tune.base import bucket_table

CROPS = ("center", "top", "random")


def bucket_sizes(resolution: int) -> set[tuple[int, int]]:
    """Every (height, width) of the table for ``resolution``."""
    return {(int(h), int(w)) for h, w in bucket_table(resolution).values()}


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) of the bin whose aspect ratio is nearest to ``height / width``."""
    return PixArtImageProcessor.classify_height_width_bin(height, width, bucket_table(resolution))


def cover_scale(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The factor that makes an image of ``size`` (height, width) cover ``bucket``."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], crop: str, seed: int = 0) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of ``bucket`` inside an image of ``resized`` (height, width).

    ``random`` is seeded by the caller (from the image's content), so that the same
    image always gets the same crop and the cache stays valid across runs.
    """
    spare_y, spare_x = resized[0] - bucket[0], resized[1] - bucket[1]
    if crop == "center":
        top, left = spare_y // 2, spare_x // 2
    elif crop == "top":
        # Portraits lose their feet rather than their heads.
        top, left = 0, spare_x // 2
    elif crop == "random":
        import random

        rng = random.Random(seed)
        top, left = rng.randint(0, spare_y), rng.randint(0, spare_x)
    else:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return left, top, left + bucket[1], top + bucket[0]


def bucket_region(size: tuple[int, int], bucket: tuple[int, int], crop: str = "center", seed: int = 0) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of an image of ``size`` (height, width) that fills ``bucket``.

    In the image's own full-size pixel coordinates, possibly fractional: the crop
    (``crop_box``) placed on the covering size, mapped back through the one scale
    that makes the image cover the bucket. The image (``resize_to_bucket``) and its
    loss mask (``masks.mask_to_latent``) are both cut from this region.
    """
    height, width = size
    factor = cover_scale((height, width), bucket)
    # ceil, so rounding never leaves the covering size a pixel short of the bucket
    resized = (max(bucket[0], math.ceil(height * factor - 1e-6)), max(bucket[1], math.ceil(width * factor - 1e-6)))
    left, top, _, _ = crop_box(resized, bucket, crop, seed)
    # kept inside the image
    region_w, region_h = min(width, bucket[1] / factor), min(height, bucket[0] / factor)
    x0, y0 = min(left / factor, width - region_w), min(top / factor, height - region_h)
    return x0, y0, x0 + region_w, y0 + region_h


def resize_to_bucket(
    image: Image.Image, bucket: tuple[int, int], crop: str = "center", seed: int = 0, full_size: tuple[int, int] | None = None, scale: int = 1
) -> Image.Image:
    """Resizes ``image`` to cover ``bucket`` (keeping its aspect ratio) and crops it to the bucket exactly.

    Only the bucket's region of the source (``bucket_region``) is resampled,
    straight to the bucket (Lanczos, with Pillow's ``box``): no time spent on
    pixels the crop throws away, and one exact scale on both axes. When ``image``
    is a JPEG decoded ``scale`` times smaller from an image of ``full_size``
    (height, width), the geometry is computed on the full size, so the reduced
    decode yields the same region at the same scale.
    """
    region = bucket_region(full_size or (image.height, image.width), bucket, crop, seed)
    box = tuple(v / scale for v in region)
    box = (box[0], box[1], min(box[2], image.width), min(box[3], image.height))
    # Lanczos with reducing_gap: sharp downscales at a fraction of the cost on big photos.
    return image.resize((bucket[1], bucket[0]), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
