"""File-system helpers that keep what the user already has intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; renames it onto ``target`` on success.

    A crash (or a full disk) while writing leaves ``target`` as it was: either the
    old complete file or folder, or nothing. Works for files and for folders.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()  # the caller decides whether it writes a file or a folder here
    try:
        yield tmp
        _apply_umask(tmp)
        if target.is_dir() and tmp.is_dir():
            # Folders cannot be replaced in one rename: move the old one aside first,
            # so that at every moment one complete folder exists under a known name.
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    # Elsewhere: set and restore at once (a thread creating a file just then would get 022).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Gives the files just written the mode the umask asks for (0644 under 022).

    Some writers (safetensors' save_file among them) create their files 0600 whatever
    the umask, which a shared or served folder cannot read. Hard links are left
    alone: they share their mode with a file the user already had (a fused model
    links the base model's files).
    """
    mode = 0o666 & ~current_umask()
    for file in [path] if not path.is_dir() else [p for p in path.rglob("*")]:
        with contextlib.suppress(OSError):
            info = file.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and stat.S_IMODE(info.st_mode) != mode:
                os.chmod(file, mode)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
