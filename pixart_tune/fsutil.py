"""File-system helpers that keep what the user already has intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Collection, Iterator, Sequence

from pixart_tune.errors import UserError


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


class NotRegularFile(OSError):
    """A path that is not a plain file (a FIFO, a device, a socket, a folder): never opened for reading."""


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ("a FIFO (named pipe)", "a folder", ...)."""
    for test, words in (
        (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def read_regular(path: str | Path) -> bytes:
    """The bytes of ``path``, which must be a regular file (symlinks followed).

    A FIFO would block ``open`` until a writer comes, and a device could stream
    without end: the file is opened non-blocking and checked on its open handle,
    so nothing but a regular file is ever read, even one swapped in after a check.
    Raises ``NotRegularFile`` (an ``OSError``) for anything else.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{file_kind(mode)}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def os_error_text(error: OSError) -> str:
    """An ``OSError`` as a short phrase: its strerror (``Permission denied``), or its message."""
    if isinstance(error, NotRegularFile):
        return str(error)
    return error.strerror or str(error) or type(error).__name__


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogate escapes) written as ``\\xNN``.

    A name in Latin-1 on a UTF-8 system comes out of ``os.listdir`` with lone
    surrogates, which no UTF-8 file, JSON report or terminal can hold.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def _start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux); "" where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of proc(5), counted after the name
    except (OSError, IndexError):
        return ""


def _holder_alive(pid: int, started: str) -> bool:
    """Whether the process that wrote a lock still runs: ``pid`` lives and, where known, started when it said."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    # After a restart (a container's pids start again from 1) another process may carry the pid.
    now = _start_time(pid)
    return not (started and now and now != started)


class LockBusy(Exception):
    """The lock is held by a live process (``pid``)."""

    def __init__(self, path: Path, pid: int):
        super().__init__(f"{path} is held by process {pid}")
        self.path, self.pid = path, pid


@contextlib.contextmanager
def pid_lock(path: str | Path) -> Iterator[Path]:
    """Holds the lock file ``path`` for the ``with`` block; it holds this process's pid and start time.

    Raises ``LockBusy`` when a live process holds it (this one included: a second
    thread); a lock left by a dead process (killed, or the machine restarted, its
    pid now another process's) is taken over. Other ``OSError``s (a folder that
    cannot be written) pass through.
    """
    path = Path(path)
    identity = f"{os.getpid()} {_start_time(os.getpid())}".strip() + "\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                held = path.read_text(encoding="utf-8").split()
                pid, started = int(held[0]), (held[1] if len(held) > 1 else "")
            except FileNotFoundError:
                continue  # released just now
            except (OSError, ValueError, IndexError):
                # Empty or garbled: its writer is writing its pid this instant, or died before it could.
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime < 10:
                        raise LockBusy(path, -1) from None
                pid, started = -1, ""
            if _holder_alive(pid, started):  # this process too: another thread of it holds the lock
                raise LockBusy(path, pid) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(identity)
        break
    else:
        raise LockBusy(path, -1)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == identity:
                path.unlink()


# --- the output policy of the verbs that write files (sample, export, merge) -----------


def _relation(output: Path, source: Path) -> str | None:
    """How ``output`` overlaps ``source`` ("is", "holds", "lies inside"), both resolved; None when apart."""
    if output == source:
        return "is"
    if source.is_relative_to(output):
        return "holds"
    if output.is_relative_to(source):
        return "lies inside"
    return None


def refuse_unsafe_outputs(
    outputs: Sequence[str | Path],
    inputs: Sequence[tuple[str | Path, str]] = (),
    *,
    overwrite: bool = False,
    kind: str = "file",
    flag: str = "--out",
    own: Collection[str] | None = None,
) -> None:
    """The one output policy: what a verb may write, checked before it reads or computes anything.

    ``inputs`` are (path, what it is) pairs. Refused whatever ``overwrite`` says: an
    output that is an input, holds one or lies inside one (writing it could destroy
    that input), and an output of the other ``kind`` ("file" or "folder") than the
    one written. Refused without ``overwrite``: an output that exists. ``own``: the
    names a folder output holds when the verb writes it whole (it replaces the
    folder); an existing folder holding anything else is refused, so ``--overwrite``
    replaces the verb's own outputs and never the user's other files.
    """
    for output in map(Path, outputs):
        target = output.resolve()
        for item, what in inputs:
            relation = _relation(target, Path(item).resolve())
            if relation:
                raise UserError(f"the output {output} {relation} {what} ({item}); writing it could destroy that input: choose a {flag} outside it")
        for parent in output.absolute().parents:
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise UserError(f"{parent} is a file, where a folder is written for {flag} {output}; move it away or choose another {flag}")
                break
        if not os.path.lexists(output):
            continue
        if output.is_dir() != (kind == "folder"):
            have = "a folder" if output.is_dir() else "a file"
            raise UserError(f"{flag} {output} is {have}, where a {kind} is written; move it away or choose another {flag}")
        if not overwrite:
            raise UserError(f"{output} exists; choose another {flag} or pass --overwrite to replace it")
        foreign = sorted(p.name for p in output.iterdir() if p.name not in own) if own is not None else []
        if foreign:
            raise UserError(
                f"{flag} {output} holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which this "
                f"command does not write; --overwrite replaces a folder of its own outputs only: move those away or choose another {flag}"
            )


@contextlib.contextmanager
def files_into(target: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``target``; on success moves the files written there into ``target``.

    Unlike :func:`atomic_path` the folder is never replaced whole: each file written
    replaces the file of the same name (atomically), and whatever else ``target``
    holds stays. A destination of the wrong kind (a folder where a file goes, a file
    where a folder goes) is refused before any file moves. A new ``target`` appears
    complete, at once.
    """
    target = Path(target)
    if not os.path.lexists(target):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if not p.is_dir())
        for relative in files:
            for parent in reversed(relative.parents[:-1]):
                if os.path.lexists(target / parent) and not (target / parent).is_dir():
                    raise UserError(f"{target / parent} is a file, where a folder is written; move it away")
            if (target / relative).is_dir():
                raise UserError(f"{target / relative} is a folder, where a file is written; move it away")
        for relative in files:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / relative, target / relative)
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
