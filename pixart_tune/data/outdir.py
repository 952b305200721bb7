"""The ``--out`` folder of prepare: what may be written there, and one run at a time.

Prepare writes only its own outputs (``OUTPUT_FILES``, ``OUTPUT_FOLDERS``) into
``--out``, never into the source, and refuses before writing anything when that
cannot be kept: an ``--out`` that is a file or lies inside the source, one holding
the user's own files, an output of the wrong kind (a file named ``latents``), or
an output that is a link into the source. While a run writes, it holds
``LOCK_FILE`` (its pid inside), so a second prepare into the same folder refuses
instead of interleaving its manifest with the first's; a lock left by a process
that died is taken over.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from pixart_tune.base import MANIFEST, REPORT, SCAN_INDEX
from pixart_tune.errors import UserError
from pixart_tune.fsutil import LockBusy, file_kind, os_error_text, pid_lock, printable

OUTPUT_FILES = (MANIFEST, REPORT, SCAN_INDEX)
OUTPUT_FOLDERS = ("latents", "text", "captions", "masks")
LOCK_FILE = ".prepare.lock"
"""Hidden, like the atomic writes in flight: an earlier run's folder stays free of foreign names."""


def check_out(source: str, out: Path) -> None:
    """Refuses an ``--out`` that prepare could not write without harm; writes nothing."""
    shown = printable(str(out))
    if os.path.lexists(out) and not out.is_dir():
        what = "a broken symlink" if out.is_symlink() and not out.exists() else "a file"
        raise UserError(f"--out {shown} is {what}; give a folder (new, empty, or of an earlier prepare run)")
    if Path(source).exists():
        real_source, real_out = Path(source).resolve(), out.resolve()
        if real_out == real_source or real_source in real_out.parents:
            raise UserError(f"--out {shown} is inside the source {source}; prepare never writes into the source, choose a folder outside it")
        if real_out in real_source.parents:
            # The source could be one of prepare's own subfolders (text/, latents/) of --out.
            raise UserError(f"the source {source} is inside --out {shown}; choose an --out folder beside the source, not around it")
    if not out.is_dir():
        return
    _refuse_foreign(out)
    for name in OUTPUT_FILES + OUTPUT_FOLDERS:
        path = out / name
        if not os.path.lexists(path):
            continue
        if Path(source).exists() and _inside(path.resolve(), Path(source).resolve()):
            raise UserError(
                f"--out {shown}/{name} is a link into the source ({path.resolve()}); prepare never writes into the source: "
                "remove the link or choose another --out"
            )
        want_folder = name in OUTPUT_FOLDERS
        try:
            mode = path.stat().st_mode
        except OSError as error:
            raise UserError(f"--out {shown}/{name} cannot be used ({os_error_text(error)}); remove it or choose another --out") from None
        is_folder = path.is_dir()
        if want_folder != is_folder or (not want_folder and not path.is_file()):
            raise UserError(
                f"--out {shown}/{name} is {file_kind(mode) if not path.is_file() else 'a file'}, where prepare writes "
                f"{'a folder' if want_folder else 'a file'}; move it away or choose another --out"
            )


def _refuse_foreign(out: Path) -> None:
    """Refuses an --out folder holding files prepare did not write (it would overwrite them)."""
    # Hidden entries are atomic writes in flight (.name.XXXX.tmp) of an interrupted run, and the lock.
    names = set(OUTPUT_FILES + OUTPUT_FOLDERS)
    foreign = sorted(printable(p.name) for p in out.iterdir() if p.name not in names and not p.name.startswith("."))
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(
            f"--out {printable(str(out))} holds files prepare did not write ({listed}); give a new or empty folder, "
            "or the folder of an earlier prepare run to update it"
        )


@contextlib.contextmanager
def locked_out(out: Path) -> Iterator[None]:
    """Creates ``out`` if needed and holds its lock for the ``with`` block (one prepare at a time per folder)."""
    shown = printable(str(out))
    with contextlib.ExitStack() as stack:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(pid_lock(out / LOCK_FILE))
        except LockBusy as busy:
            who = f"process {busy.pid}" if busy.pid > 0 else "another process"
            raise UserError(
                f"--out {shown} is being prepared by {who} (lock {busy.path}); wait for it to finish, "
                "or choose another --out (a lock left by a process that no longer runs is taken over)"
            ) from None
        except OSError as error:
            raise UserError(f"cannot write to --out {shown} ({os_error_text(error)}); choose a folder you can write to") from None
        yield


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
