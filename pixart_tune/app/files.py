"""Which files the app may touch: the path guard, output names and adapter discovery.

The app reads and writes only under the folders it was started with. Every path
a user types goes through :class:`PathGuard`, which resolves it (``..`` removed,
symlinks followed) and refuses it when the real location is outside those
folders, so a link inside the runs folder cannot lead the app elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINTS, MANIFEST
from pixart_tune.errors import UserError

# Names of outputs the app writes: one plain folder name, never a path.
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class PathGuard:
    """Resolves paths and refuses any that land outside the allowed folders."""

    def __init__(self, roots: Iterable[str | Path]):
        self.roots = unique(Path(r).expanduser().resolve() for r in roots)

    def allows(self, path: str | Path) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved.is_relative_to(root) for root in self.roots)

    def check(self, path: str | Path, what: str = "path") -> Path:
        """The resolved ``path`` if it exists under an allowed folder; a UserError otherwise.

        A relative path is looked up under each allowed folder in turn, then under
        the working folder. Every refusal of a path outside the folders reads the
        same (:meth:`refusal`), whether it exists, is a link or is missing: the
        answer must not tell anyone reaching the page what is on the machine.
        """
        text = str(path).strip()
        if not text:
            raise UserError(f"no {what} given")
        raw = Path(text).expanduser()
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.roots] + [raw]
        # Judged by the folder holding it (links followed) before anything about the path itself is looked up.
        placed = [c for c in candidates if self.allows(c.parent.resolve() / c.name)]
        if not placed:
            raise UserError(self.refusal(text, what))
        existing = next((c for c in placed if c.exists() or c.is_symlink()), None)
        if existing is None:
            raise UserError(f"{what} {text!r} not found under the allowed folders: {self.describe()}")
        resolved = existing.resolve()
        if not self.allows(resolved) or not resolved.exists():  # a link leading out, or a broken one: said alike
            raise UserError(self.refusal(text, what))
        return resolved

    def refusal(self, text: str, what: str) -> str:
        article = "an" if what[:1] in "aeiou" else "a"
        return f"{text!r}: not {article} {what} this app may read (it reads only under {self.describe()}; copy it into the runs folder)"

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def output_path(outputs: str | Path, name: str) -> Path:
    """``outputs/name`` for a new output; refuses path-like names and existing outputs."""
    name = str(name or "").strip()
    if not _OUTPUT_NAME.fullmatch(name):
        raise UserError(
            f"output name {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no slashes), e.g. style-mix"
        )
    target = Path(outputs).resolve() / name
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists; choose another output name (nothing was overwritten)")
    return target


def discover_adapters(roots: Sequence[Path], guard: PathGuard, limit: int = 2000) -> list[Path]:
    """Adapters under ``roots``: PEFT folders and ``.safetensors`` files holding LoRA keys.

    Skips hidden entries (half-written outputs start with a dot), diffusers model
    folders and prepared datasets (their many ``.safetensors`` are not adapters),
    and anything whose real location is outside the allowed folders.
    """

    found: list[Path] = []
    for root in roots:
        if not Path(root).is_dir():
            continue
        # followlinks=False: a linked folder is never walked into, wherever it points.
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(folder)
            if "model_index.json" in files or MANIFEST in files:
                dirs[:] = []
                continue
            if ADAPTER_WEIGHTS in files and ADAPTER_CONFIG in files:
                if guard.allows(here / ADAPTER_WEIGHTS) and guard.allows(here / ADAPTER_CONFIG):
                    found.append(here.resolve())
                dirs[:] = []  # a PEFT folder's subfolders are not separate adapters
                continue
            for name in sorted(files):
                path = here / name
                if name.endswith(".safetensors") and not name.startswith(".") and guard.allows(path) and _has_lora_keys(path):
                    found.append(path.resolve())
            if len(found) >= limit:
                break
    return unique(found)


def discover_models(outputs: Path, guard: PathGuard) -> list[Path]:
    """Fused model folders (with ``model_index.json``) directly under ``outputs``."""
    if not Path(outputs).is_dir():
        return []
    return [
        p.resolve()
        for p in sorted(Path(outputs).iterdir())
        if not p.name.startswith(".") and (p / "model_index.json").is_file() and guard.allows(p)
    ]


def _has_lora_keys(path: Path) -> bool:
    """Reads only the safetensors header: cheap even for large files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return any("lora_" in key for key in handle.keys())
    except Exception:  # not a readable safetensors file: not an adapter
        return False


def label_for(path: str | Path, roots: Sequence[Path]) -> str:
    """A short name for a path: relative to the innermost allowed folder holding it."""
    path = Path(path)
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):
        if path == root:
            return root.name
        if path.is_relative_to(root):
            return f"{root.name}/{path.relative_to(root).as_posix()}"
    return str(path)


_STEP = re.compile(r"^step-(\d+)$")


def run_position(path: str | Path) -> tuple[Path, int] | None:
    """(run folder, order) for an adapter a training run wrote; None for any other adapter.

    A run writes its final adapter to ``RUN/adapter`` (with an EMA, the raw weights
    to ``RUN/adapter_raw``) and checkpoints to ``RUN/checkpoints/step-NNNNNN/adapter``.
    The order puts the final adapter first, then the raw one, then the checkpoints,
    latest first.
    """
    path = Path(path)
    step = _STEP.match(path.parent.name)
    if path.name == ADAPTER_DIR and step is not None and path.parent.parent.name == CHECKPOINTS:
        return path.parent.parent.parent, int(step.group(1))
    if path.name == ADAPTER_DIR:
        return path.parent, -2
    if path.name == f"{ADAPTER_DIR}_raw":
        return path.parent, -1
    return None


def adapter_label(path: str | Path, roots: Sequence[Path]) -> str:
    """``style-a / final``, ``style-a / step 500`` for a run's adapters; :func:`label_for` for others."""
    where = run_position(path)
    if where is None:
        return label_for(path, roots)
    run, step = where
    run = run.name if run in roots else label_for(run, roots).split("/", 1)[-1]
    return f"{run} / " + {-2: "final", -1: "final (raw, before EMA)"}.get(step, f"step {step}")


def group_by_run(paths: Iterable[Path]) -> list[Path]:
    """Each run's adapters together (final first, checkpoints latest first), at the place of the run's first one; others as they come."""
    paths = unique(Path(p) for p in paths)
    groups: dict[Path, list[tuple[int, Path]]] = {}
    for path in paths:
        where = run_position(path)
        groups.setdefault(where[0] if where else path, []).append((where[1] if where else 0, path))

    def order(item: tuple[int, Path]) -> tuple[int, int]:
        return (item[0], 0) if item[0] < 0 else (0, -item[0])  # final, raw, then the latest step first

    return [path for members in groups.values() for _, path in sorted(members, key=order)]


def unique(paths: Iterable[Path]) -> list[Path]:
    """Paths in first-seen order without repeats."""
    return list(dict.fromkeys(paths))
