"""What earlier runs learned from each image file, so that a re-run need not decode it again.

``DIR/scan_index.json`` maps a key made of the file's bytes (their sha256) and of
the decode settings to what decoding gave: the full upright size, the pixel hash
(and the scale it was taken at), the full-size hash when known, or the reason the
file was skipped. An unchanged file is recognised by reading and hashing its
bytes, tens of times cheaper than decoding it; a changed file has other bytes,
hence another key, and is decoded again. Keys name bytes, not paths, so a renamed
or copied file is recognised too, and a file edited in place with its size and
modification time kept is still caught.

The index is rewritten at the end of each run with the files that run saw. It is
only ever a shortcut: missing, stale or unreadable, it costs decoding time, never
a wrong result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import PIL

from pixart_tune.base import SCAN_INDEX
from pixart_tune.data.cache import content_key
from pixart_tune.fsutil import atomic_path

logger = logging.getLogger(__name__)

FORMAT = 1


class ScanIndex:
    """The index of one prepared dataset folder, for one set of decode settings."""

    def __init__(self, root: str | Path, settings: str):
        self.path = Path(root) / SCAN_INDEX
        # A new Pillow may decode differently (libjpeg versions round differently): start over then.
        self.settings = content_key(settings, PIL.__version__, str(FORMAT))
        self._old = self._load()
        self._new: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable %s (%s); images are decoded again", self.path, error)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def key(self, data: bytes, reduced: bool) -> str:
        """The entry of a file with these bytes; ``reduced``: whether JPEGs may be decoded reduced."""
        return content_key("file", hashlib.sha256(data).digest(), self.settings, f"reduced={reduced}")

    def get(self, key: str) -> dict[str, Any] | None:
        """What decoding gave for ``key`` in this run or an earlier one (safe to call from any thread)."""
        return self._new.get(key) or self._old.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._new[key] = value

    def note(self, key: str | None, **fields: Any) -> None:
        """Adds what a run learned later about a decoded file: its ``full`` hash, whether it was a ``duplicate``."""
        entry = self.get(key) if key is not None else None
        if entry is not None and "skip" not in entry and any(entry.get(k) != v for k, v in fields.items()):
            self._new[key] = dict(entry, **fields)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "files": self._new}, separators=(",", ":")), encoding="utf-8")
