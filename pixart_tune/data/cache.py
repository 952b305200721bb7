"""The on-disk feature cache that ``prepare`` writes and the trainer streams from.

Layout of a prepared dataset folder::

    dataset.json                 the manifest (model facts + one entry per accepted image, with its caption variants)
    report.json                  what prepare accepted, skipped and found duplicated
    latents/<key>.safetensors    {"latent": [C, H/8, W/8]}, already times the VAE scaling factor
    text/<key>.safetensors       {"embeds": [n, D]}: the n valid T5 tokens only
    masks/<key>.safetensors      {"mask": [1, H/8, W/8]} float32 loss weights in [0, 1], for images with a mask

Entries are keyed by content (image bytes + transform for latents, caption +
encoder for text), never by position, so a re-run reuses what is done, and a
shuffled loader can never pair one image's latent with another's caption. Text
embeddings are stored without their padding: ``read_text`` pads them back to
``max_tokens`` and rebuilds the attention mask, which saves ~90% of the disk for
typical captions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pixart_tune.base import MANIFEST
from pixart_tune.errors import UserError
from pixart_tune.fsutil import atomic_path, os_error_text, read_regular

# 2: an item lists every caption variant (``captions``, ``text_keys``). Format 1
# (one ``caption`` / ``text_key``) is still read; a version that reads only 1 refuses
# a format-2 manifest with its "re-run prepare" message instead of misreading it.
# An item with a loss mask also has ``mask_key``; items without one are written as
# before, so an unmasked manifest is what older versions read. Masks stay within
# format 2: a version older than masks does not ignore them silently, it refuses
# the unknown key (its "damaged ... re-run prepare" message).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


def content_key(*parts: str | bytes) -> str:
    """A stable key for a cache entry from everything that determines its content."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class CacheItem:
    source: str
    """Path of the image relative to the source folder (or a dataset row id)."""
    captions: tuple[str, ...]
    """The final captions (trigger, prefix and suffix applied), distinct, in the order found; most items have one."""
    bucket: tuple[int, int]
    """(height, width) in pixels, a value of the diffusers aspect-ratio table."""
    latent_key: str
    text_keys: tuple[str, ...]
    """Text entry of each caption, in the order of ``captions``."""
    mask_key: str | None = None
    """Loss-mask entry (``FeatureCache.read_mask``), or None for an image trained everywhere alike."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "text_keys", tuple(self.text_keys))
        if not self.captions or len(self.captions) != len(self.text_keys):
            raise ValueError(f"{self.source}: {len(self.captions)} captions for {len(self.text_keys)} text keys; need at least one of each, as many")

    @property
    def caption(self) -> str:
        """The first caption: the only one unless prepare ran with caption variants."""
        return self.captions[0]

    @property
    def text_key(self) -> str:
        return self.text_keys[0]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CacheItem":
        data = dict(data, bucket=tuple(data["bucket"]))
        if "text_key" in data:  # format 1: one caption per item
            data["captions"], data["text_keys"] = [data.pop("caption")], [data.pop("text_key")]
        return cls(**data)


@dataclasses.dataclass
class Manifest:
    model: str
    """The model folder or hub id whose VAE and T5 made the features."""
    resolution: int
    latent_channels: int
    caption_channels: int
    max_tokens: int
    vae_scaling_factor: float
    empty_text_key: str
    """Text entry of the empty prompt, used for caption dropout."""
    items: list[CacheItem]
    text_encoder: str = ""
    """Fingerprint of the T5 that made the embeddings (``component_fingerprint``); empty in older manifests."""
    components: str = ""
    """Where the VAE, T5, tokenizer and scheduler came from when not the model itself
    (a transformer alone); training and validation use the same."""
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["items"] = [_item_json(i) for i in self.items]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        """A manifest of any readable format, as the current format."""
        items = [CacheItem.from_json(i) for i in data["items"]]
        return cls(**dict(data, items=items, format=FORMAT_VERSION))


def _item_json(item: CacheItem) -> dict[str, Any]:
    data = dict(dataclasses.asdict(item), bucket=list(item.bucket), captions=list(item.captions), text_keys=list(item.text_keys))
    if data["mask_key"] is None:
        del data["mask_key"]  # an unmasked item reads as it did before masks existed
    return data


class FeatureCache:
    """Reads and writes one prepared dataset folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # latents
    def latent_path(self, key: str) -> Path:
        return self.root / "latents" / f"{key}.safetensors"

    def has_latent(self, key: str) -> bool:
        """Whether the entry is there and whole (a damaged one counts as missing, so it is encoded again)."""
        return entry_intact(self.latent_path(key))

    def write_latent(self, key: str, latent: torch.Tensor) -> None:
        _write(self.latent_path(key), {"latent": latent})

    def read_latent(self, key: str) -> torch.Tensor:
        return _read(self.latent_path(key))["latent"]

    # text
    def text_path(self, key: str) -> Path:
        return self.root / "text" / f"{key}.safetensors"

    def has_text(self, key: str) -> bool:
        return entry_intact(self.text_path(key))

    def write_text(self, key: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Stores the valid tokens of one prompt (``embeds`` [T, D], ``mask`` [T])."""
        length = int(mask.sum())
        _write(self.text_path(key), {"embeds": embeds[:length]})

    def read_embeds(self, key: str) -> torch.Tensor:
        """The stored embeds [n, D] of one prompt: its n valid tokens, no padding."""
        return _read(self.text_path(key))["embeds"]

    def read_text(self, key: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (embeds [max_tokens, D] zero-padded, mask [max_tokens] as long)."""
        embeds = self.read_embeds(key)
        length = embeds.shape[0]
        padded = embeds.new_zeros(max_tokens, embeds.shape[1])
        padded[:length] = embeds
        mask = torch.zeros(max_tokens, dtype=torch.long)
        mask[:length] = 1
        return padded, mask

    # loss masks
    def mask_path(self, key: str) -> Path:
        return self.root / "masks" / f"{key}.safetensors"

    def has_mask(self, key: str) -> bool:
        return entry_intact(self.mask_path(key))

    def write_mask(self, key: str, mask: torch.Tensor) -> None:
        """Stores one image's loss weights: [h, w] or [1, h, w] at latent resolution, values in [0, 1]."""
        mask = torch.as_tensor(mask, dtype=torch.float32)
        mask = mask[None] if mask.dim() == 2 else mask
        if mask.dim() != 3 or mask.shape[0] != 1 or mask.numel() == 0:
            raise ValueError(f"a mask is [h, w] or [1, h, w], got shape {list(mask.shape)}")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError("mask weights must lie in [0, 1]")
        _write(self.mask_path(key), {"mask": mask})

    def read_mask(self, key: str) -> torch.Tensor:
        """The loss weights [1, H/8, W/8] (float32, in [0, 1]) of an item whose ``mask_key`` is ``key``."""
        return _read(self.mask_path(key))["mask"].float()

    # manifest
    def write_manifest(self, manifest: Manifest) -> None:
        with atomic_path(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest.to_json(), indent=1), encoding="utf-8")

    def read_manifest(self) -> Manifest:
        path = self.root / MANIFEST
        if not path.is_file():
            raise UserError(f"{self.root} is not a prepared dataset (no {MANIFEST}); run 'pixart-tune prepare' first")
        def damaged(why: str) -> UserError:
            return UserError(f"{path} is damaged ({why}); re-run 'pixart-tune prepare' with the same source and --out to rewrite it")

        try:
            data = json.loads(read_regular(path).decode("utf-8"))
        except OSError as error:
            raise UserError(f"cannot read {path} ({os_error_text(error)})") from None
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
            raise damaged(f"not JSON: {error}") from None
        if not isinstance(data, dict):
            raise damaged("not a JSON object")
        if data.get("format") not in READABLE_FORMATS:
            readable = " or ".join(map(str, READABLE_FORMATS))
            raise UserError(f"{path} has cache format {data.get('format')}, this version reads {readable}; re-run prepare")
        try:
            return Manifest.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise damaged(f"{type(error).__name__}: {error}") from None


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"cache entry {path} is missing; re-run 'pixart-tune prepare' on this dataset")
    if not entry_intact(path):
        raise UserError(f"cache entry {path} is damaged (cut short or overwritten); re-run 'pixart-tune prepare' on this dataset: it encodes damaged entries again")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
        raise UserError(f"cache entry {path} is damaged ({error}); re-run 'pixart-tune prepare' on this dataset: it encodes damaged entries again") from None


def entry_intact(path: Path) -> bool:
    """Whether ``path`` is a regular safetensors file whose header parses and whose tensors fill it exactly.

    Reads the header only (a few hundred bytes): cheap enough for every entry of a
    re-run, and it catches what a crash, a full disk or a stray copy leaves: a
    file cut short, an empty file, garbage in place of a header.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size < 8:
            return False
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > min(info.st_size - 8, 100_000_000):
                return False
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return bool(ends) and 8 + length + max(ends) == info.st_size
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
