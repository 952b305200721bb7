"""Finding the image files under a source folder, and refusing what must not be read.

A symlink is followed only when its target lies inside the source folder: a link
to ``/etc`` or to someone's home folder is recorded as skipped, never read. The
walk is sorted, so runs and reports are reproducible.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

from pixart_tune.fsutil import file_kind, os_error_text, printable

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


def scan_folder(root: str | Path, select: Callable[[str], bool] = is_image_name) -> Iterator[Found]:
    """Every file with an image extension (any letter case) under ``root``, nested folders too
    (``select``: which file names to yield instead).

    Nothing is opened here: a file is classified by ``lstat``/``stat`` alone, so a
    FIFO or a device never blocks the scan. What cannot be used is yielded with its
    reason: links leading outside, broken or looping links, files that are not
    regular, and folders that cannot be listed (their images would go unmentioned).
    """
    root = Path(root).absolute()
    real_root = root.resolve()
    seen_dirs: set[Path] = set()
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=True):
        yield from _unlisted(unlisted, root)
        here = Path(dirpath)
        real_here = here.resolve()
        # A folder symlink that leads outside the source, or back up into a loop.
        if not _inside(real_here, real_root) or real_here in seen_dirs:
            dirnames[:] = []
            rel = printable(here.relative_to(root).as_posix())
            reason = "symlinked folder points outside the source folder" if not _inside(real_here, real_root) else "symlinked folder loops back into a folder already scanned"
            yield Found(here, rel, reason)
            continue
        seen_dirs.add(real_here)
        dirnames.sort()
        for name in sorted(filenames):
            if not select(name):
                continue
            path = here / name
            rel = printable(path.relative_to(root).as_posix())
            yield Found(path, rel, _why_not(path, real_root))
    yield from _unlisted(unlisted, root)


def _why_not(path: Path, real_root: Path) -> str | None:
    """Why the file at ``path`` must not be read (None: it is a regular file inside the source)."""
    try:
        info = path.lstat()
    except OSError as error:
        return f"vanished during the scan ({os_error_text(error)})"
    if stat.S_ISLNK(info.st_mode):
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return "broken symlink: its target does not exist"
        except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
            return "symlink loop: the link leads back to itself and has no target; remove it"
        if not _inside(target, real_root):
            return f"symlink points outside the source folder (to {printable(str(target))})"
        try:
            info = target.stat()
        except OSError as error:
            return f"cannot follow the symlink ({os_error_text(error)})"
        if not stat.S_ISREG(info.st_mode):
            return f"symlink to {file_kind(info.st_mode)}, not a regular file"
        return None
    if not stat.S_ISREG(info.st_mode):
        return f"{file_kind(info.st_mode)}, not a regular file"
    return None


def _unlisted(errors: list[OSError], root: Path) -> Iterator[Found]:
    """Folders ``os.walk`` could not list (its ``onerror`` collected them), as skipped entries."""
    while errors:
        error = errors.pop(0)
        folder = Path(error.filename) if error.filename else root
        try:
            rel = folder.relative_to(root).as_posix()
        except ValueError:
            rel = str(folder)
        if isinstance(error, FileNotFoundError):
            reason = "folder vanished during the scan (deleted or moved while prepare ran): the images in it were not read"
        else:
            reason = f"cannot list this folder ({os_error_text(error)}): the images in it were not read; fix its permissions and re-run"
        yield Found(folder, printable(rel), reason)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
