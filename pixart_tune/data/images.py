"""Decoding one image file into clean RGB pixels, or a plain reason why it cannot be used.

Every image is fully decoded (a header alone says nothing about a truncated
body), turned upright by its EXIF orientation, and converted to 8-bit RGB with
care for the modes a plain ``convert("RGB")`` gets wrong: 16-bit and float
greyscale (clipped to white), transparency (whatever colour hides under
alpha 0, often black), CMYK with an ICC profile. Nothing here raises for a bad
file: ``load_image`` returns an ``ImageSkip`` with a sentence a person understands.

A JPEG much bigger than the caller needs is decoded reduced (``Image.draft``:
libjpeg scales by 1/2, 1/4 or 1/8 inside its inverse DCT, never below the size
asked for). The whole file is still decoded, so truncation and corruption are
still found, but the pixels come out up to 64 times fewer, and everything after
(colour conversion, hashing, resizing) shrinks with them. The pixel hash is then
the hash of those reduced pixels: exactly what the resize starts from, so it is a
correct cache key; ``duplicates.py`` says how exact duplicates are still found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from typing import Any, Callable

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

# PIL's own threshold (about 89 megapixels, e.g. 9459 x 9459); beyond it decoding
# one file can take gigabytes, which is how decompression bombs work.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

_SRGB = ImageCms.createProfile("sRGB")
# EXIF orientations that turn the stored image by 90 degrees (its width becomes the height)
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

NeededSize = Callable[[int, int], "tuple[int, int] | None"]
"""Maps an upright (height, width) to the smallest (height, width) the caller will use, or None for full size."""


@dataclasses.dataclass(frozen=True)
class ImageSkip:
    reason: str


@dataclasses.dataclass
class LoadedImage:
    image: Image.Image
    """Upright, 8-bit RGB; reduced ``scale`` times from ``size`` for a JPEG decoded reduced."""
    pixel_hash: str
    """sha256 of ``image``'s RGB pixels and size: equal for exact duplicates decoded at the same scale, whatever their files."""
    original_mode: str
    size: tuple[int, int] = (0, 0)
    """(height, width) of the full upright image, whatever the scale it was decoded at."""
    scale: int = 1
    """1 for a full-size decode, else the JPEG DCT reduction (2, 4 or 8)."""
    alpha: Image.Image | None = None
    """The upright alpha channel (mode L, full size) of an image with real transparency; None for an opaque one."""

    @property
    def full_hash(self) -> str | None:
        """The pixel hash of the full-size image, when this decode gives it (``scale`` 1)."""
        return self.pixel_hash if self.scale == 1 else None

    @property
    def alpha_hash(self) -> str | None:
        return None if self.alpha is None else pixel_hash(self.alpha)


def load_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    needed: NeededSize | None = None,
) -> LoadedImage | ImageSkip:
    """Decodes ``data`` (a whole file) into a ``LoadedImage``, or says why it cannot.

    ``needed`` (optional) lets a JPEG be decoded reduced, to no less than the size it returns.
    """
    decoded = decode(data, lambda image: (to_rgb(image, background), alpha_channel(image)), max_pixels, needed)
    if isinstance(decoded, ImageSkip):
        return decoded
    (rgb, alpha), original_mode, size, scale = decoded
    if rgb.width < 1 or rgb.height < 1:
        return ImageSkip("image has no pixels")
    return LoadedImage(rgb, pixel_hash(rgb), original_mode, size, scale, alpha)


def load_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str] | ImageSkip:
    """(upright 8-bit greyscale, original mode) of a whole file, as a loss mask is read; or why it cannot be.

    Colour becomes its luminance, 16-bit and float greyscale are scaled, and
    transparent pixels count as black (a mask drawn on a transparent layer).
    """
    decoded = decode(data, to_gray, max_pixels)
    if isinstance(decoded, ImageSkip):
        return decoded
    gray, original_mode, _, _ = decoded
    return gray, original_mode


def decode(data: bytes, convert: Callable[[Image.Image], Any], max_pixels: int = DEFAULT_MAX_PIXELS, needed: NeededSize | None = None):
    """(convert(upright image), original mode, upright (height, width) at full size, scale), or an ``ImageSkip``."""
    if not data:
        return ImageSkip("empty file (0 bytes)")
    try:
        # PIL warns past MAX_IMAGE_PIXELS and raises past twice that; make both an error
        # here, locally, rather than changing PIL's global limit for the whole process.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.width * image.height
            if pixels > max_pixels:
                return ImageSkip(f"decompression bomb: claims {image.width}x{image.height} = {pixels:,} pixels, over the limit of {max_pixels:,}")
            stored = (image.height, image.width)
            scale = _draft(image, needed) if needed is not None else 1
            # The whole file at once rather than 64 KiB at a time: the decoder releases the GIL,
            # and each block would take it back (a queue behind other threads).
            image.decodermaxblock = max(image.decodermaxblock, len(data))
            image.load()
            original_mode = image.mode
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS
            image = ImageOps.exif_transpose(image, in_place=True) or image
            converted = convert(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return ImageSkip(f"decompression bomb: {error}")
    except UnidentifiedImageError:
        return ImageSkip("not an image: the file's content is not in any image format Pillow reads")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt data as OSError (and, for a few
        # formats, SyntaxError or ValueError).
        text = str(error) or type(error).__name__
        if "truncated" in text.lower():
            return ImageSkip(f"truncated: the file ends before the image data does ({text})")
        return ImageSkip(f"corrupt image data: {text}")
    size = (stored[1], stored[0]) if turned else stored
    return converted, original_mode, size, scale


def pixel_hash(rgb: Image.Image) -> str:
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _draft(image: Image.Image, needed: NeededSize) -> int:
    """Asks a JPEG decoder for a DCT-reduced decode no smaller than ``needed``; returns the reduction."""
    if image.format != "JPEG":  # draft is a JPEG feature (and MPO's frames are not all drafted alike)
        return 1
    turned = image.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS
    upright = (image.width, image.height) if turned else (image.height, image.width)
    want = needed(*upright)
    if want is None:
        return 1
    height, width = (want[1], want[0]) if turned else want
    if image.width < 2 * width or image.height < 2 * height:
        return 1  # no reduction possible
    full_width = image.width
    drafted = image.draft(None, (max(1, width), max(1, height)))
    if not drafted:
        return 1
    # draft returns where the full image lies in the reduced one: (0, 0, width / scale, height / scale)
    return round(full_width / drafted[1][2])


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel of an image with transparency (mode L), or None when every pixel is opaque.

    An RGBA file whose alpha is 255 everywhere says nothing about where to train:
    it counts as having no alpha, as the image it looks like.
    """
    if not has_transparency(image) or image.mode in _HIGH_DEPTH:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


def to_gray(image: Image.Image) -> Image.Image:
    """8-bit greyscale from any Pillow mode: luminance of colour, transparency composited onto black."""
    if image.mode == "L" and not has_transparency(image):
        return image
    return to_rgb(image, (0, 0, 0)).convert("L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB from any Pillow mode, compositing transparency onto ``background``."""
    if image.mode in _HIGH_DEPTH:
        image = _high_depth_to_l(image)
    if has_transparency(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to Pillow's plain conversion
    if image.mode == "RGB":
        return image  # convert() would return a copy
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 8-bit, scaled rather than clipped.

    Pillow keeps 16-bit PNG/TIFF greyscale as 0..65535 in modes ``I;16*`` or ``I``;
    ``convert("L")`` would clip everything above 255 to white.
    """
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if array.size and float(np.nanmax(array)) <= 1.0 else 255.0
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:
        # 32-bit "I": Pillow's mode for 16-bit PNGs; 8-bit data stored this way also occurs
        top = 65535.0 if array.size and float(array.max()) > 255 else 255.0
    scaled = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
