"""Finding the image files under a source folder, and refusing what must not be read.

A symlink is followed only when its target lies inside the source folder: a link
to ``/etc`` or to someone's home folder is recorded as skipped, never read. The
walk is sorted, so runs and reports are reproducible.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class Found:
    path: Path
    """Absolute path (inside the source after resolving symlinks)."""
    source: str
    """Path relative to the source folder, with forward slashes, as the report names it."""
    skip: str | None = None
    """Why this file must not be read, or None."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scan_folder(root: str | Path) -> Iterator[Found]:
    """Every file with an image extension (any letter case) under ``root``, nested folders too."""
    root = Path(root).absolute()
    real_root = root.resolve()
    seen_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        # A folder symlink that leads outside the source, or back up into a loop.
        if not _inside(real_here, real_root) or real_here in seen_dirs:
            dirnames[:] = []
            rel = here.relative_to(root).as_posix()
            reason = "symlinked folder points outside the source folder" if not _inside(real_here, real_root) else "symlinked folder loops back into a folder already scanned"
            yield Found(here, rel, reason)
            continue
        seen_dirs.add(real_here)
        dirnames.sort()
        for name in sorted(filenames):
            if not is_image_name(name):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not _inside(target, real_root):
                    yield Found(path, rel, f"symlink points outside the source folder (to {target})")
                    continue
                if not target.is_file():
                    yield Found(path, rel, "broken symlink: its target does not exist")
                    continue
            elif not path.is_file():
                yield Found(path, rel, "not a regular file")
                continue
            yield Found(path, rel)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
