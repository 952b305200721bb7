"""Training runs as the Runs tab shows them: read from the run folders, never written.

A run is a folder under the runs folder that ``pixart-tune train`` wrote into
(``output_dir``, see docs/training.md): it holds ``config.yaml``, ``loss.json``,
``checkpoints/`` or a final ``adapter/``. Everything here is read through the
app's path guard, so a link inside the runs folder cannot lead the app elsewhere,
and a damaged or half-written file (a run still training, a disk that filled up)
becomes a short note on the run, never an exception. Notes and refusals name
files relative to the run only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

from pixart_tune.app.files import PathGuard
from pixart_tune.base import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    BASE_GRID,
    CHECKPOINTS,
    LOSS_HISTORY,
    MANIFEST,
    RUN_CONFIG,
    SAMPLES,
)
from pixart_tune.errors import UserError
from pixart_tune.training.plots import EVAL, OVERFIT_RISE, LossHistory, lowest_eval

RAW_ADAPTER_DIR = "adapter_raw"
"""With ``ema.enabled``: the LoRA as trained, before averaging (``adapter/`` holds the EMA weights)."""
MAX_DEPTH = 3
"""How deep under the runs folder runs are looked for (``runs/project/name`` is depth 2)."""
MAX_TEXT = 1 << 20
"""config.yaml and loss.json larger than this (1 MiB) are not read: no run writes one."""

_STEP = re.compile(r"^step-(\d+)$")
_GRID = re.compile(r"^step-(\d+)\.png$")


@dataclasses.dataclass
class Grid:
    """One validation grid: ``samples/step-NNNNNN.png``."""

    step: int
    path: Path


@dataclasses.dataclass
class RunAdapter:
    """An adapter a run wrote: a final one or a checkpoint's."""

    label: str
    """``final``, ``final, before EMA`` or ``step N``."""
    path: Path
    """The PEFT adapter folder (resolved)."""
    step: int | None = None
    """The checkpoint's optimizer step; None for the final adapters."""


@dataclasses.dataclass
class RunInfo:
    """What one run folder holds."""

    name: str
    """The run's folder relative to the runs folder (``style`` or ``project/style``)."""
    path: Path
    modified: float
    """The newest modification time of the folder and the files the trainer updates."""
    config: str = ""
    """config.yaml as written (the resolved recipe); empty without one."""
    history: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    """loss.json: series name (train, eval, clip_score) -> [(step, value), ...]."""
    grids: list[Grid] = dataclasses.field(default_factory=list)
    """Validation grids, by step."""
    base_grid: Path | None = None
    """samples/base.png: the same prompts and seeds from the base model."""
    adapters: list[RunAdapter] = dataclasses.field(default_factory=list)
    """The final adapter(s), then the checkpoints' adapters, latest first."""
    lowest: tuple[int, float, float] | None = None
    """:func:`~pixart_tune.training.plots.lowest_eval`: (step, value, rise of the last evaluation)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What could not be read, in a few words each."""

    @property
    def last_step(self) -> int | None:
        steps = [p[0] for points in self.history.values() for p in points] + [g.step for g in self.grids]
        steps += [a.step for a in self.adapters if a.step is not None]
        return max(steps) if steps else None

    def grid_at(self, step: float | None) -> Grid | None:
        """The latest grid at or before ``step`` (the first one before any; the last one for None)."""
        if not self.grids:
            return None
        if step is None:
            return self.grids[-1]
        before = [g for g in self.grids if g.step <= step]
        return before[-1] if before else self.grids[0]


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a training run's outputs."""
    return (
        (folder / RUN_CONFIG).is_file()
        or (folder / LOSS_HISTORY).is_file()
        or (folder / CHECKPOINTS).is_dir()
        or (folder / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()
    )


def list_runs(runs_root: str | Path, guard: PathGuard | None = None) -> list[RunInfo]:
    """The runs under ``runs_root`` (up to :data:`MAX_DEPTH` deep), newest first.

    Hidden folders, diffusers model folders and prepared datasets are skipped, and
    a linked folder is never walked into; a run's own subfolders are not runs.
    """
    root = Path(runs_root).resolve()
    guard = guard or PathGuard([root])
    runs: list[RunInfo] = []
    if not root.is_dir():
        return runs
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        if "model_index.json" in files or MANIFEST in files or not guard.allows(here):
            dirs[:] = []
            continue
        if depth > 0 and is_run(here):
            runs.append(read_run(here, guard, root))
            dirs[:] = []
        elif depth >= MAX_DEPTH:
            dirs[:] = []
    return sorted(runs, key=lambda r: (-r.modified, r.name))


def find_run(runs_root: str | Path, name: str, guard: PathGuard | None = None) -> RunInfo:
    """The run called ``name`` (as :func:`list_runs` names it); a UserError that reveals nothing otherwise."""
    root = Path(runs_root).resolve()
    guard = guard or PathGuard([root])
    text = str(name or "").strip()
    if not text:
        raise UserError("choose a run")
    relative = Path(text)
    # A name is echoed only when short and relative: an absolute path (even cut) would
    # show the folders around the runs folder.
    shown = repr(text) if len(text) <= 80 and not relative.is_absolute() else "of that name"
    refused = UserError(f"no run {shown} in the runs folder; press Rescan runs to list the runs there now")
    if relative.is_absolute() or ".." in relative.parts or len(relative.parts) > MAX_DEPTH:
        raise refused
    folder = root / relative
    # Every part must be a real folder inside the runs folder: no links, no hidden folders.
    parts = [root.joinpath(*relative.parts[: i + 1]) for i in range(len(relative.parts))]
    if any(p.name.startswith(".") or p.is_symlink() or not p.is_dir() for p in parts):
        raise refused
    if not guard.allows(folder) or not is_run(folder):
        raise refused
    return read_run(folder, guard, root)


def read_run(path: str | Path, guard: PathGuard | None = None, runs_root: str | Path | None = None) -> RunInfo:
    """Everything the Runs tab shows of one run folder; unreadable parts become ``notes``."""
    folder = Path(path).resolve()
    guard = guard or PathGuard([folder])
    root = Path(runs_root).resolve() if runs_root else folder.parent
    name = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder.name
    run = RunInfo(name=name, path=folder, modified=_modified(folder))
    run.config = _read_config(folder, guard, run.notes)
    run.history = _read_history(folder, guard, run.notes)
    run.grids, run.base_grid = _read_grids(folder, guard)
    run.adapters = _read_adapters(folder, guard)
    run.lowest = lowest_eval(LossHistory(folder / LOSS_HISTORY, run.history))
    return run


# --------------------------------------------------------------------------- texts


def lowest_text(run: RunInfo) -> str:
    """One line on the lowest held-out loss, and whether the run over-fitted after it."""
    if run.lowest is not None:
        step, value, rise = run.lowest
        text = f"Lowest held-out loss: **{value:.4g}** at step {step}"
        if rise > OVERFIT_RISE:
            return text + f"; the last evaluation is {rise:.0%} higher: over-fitting after it, the checkpoint nearest step {step} generalises best."
        return text + f" (the last evaluation is within {OVERFIT_RISE:.0%} of it)."
    if len(run.history.get(EVAL, [])) == 1:
        return "Held-out loss measured once: the lowest needs two evaluations (`evaluation.every`)."
    return "No held-out loss: the run held no images out (`data.eval_fraction` or `data.eval` in the recipe)."


def summary_text(run: RunInfo) -> str:
    """A few words on the run: steps, grids, adapters, notes."""
    import datetime

    last = run.last_step
    checkpoints = sum(a.step is not None for a in run.adapters)
    finals = len(run.adapters) - checkpoints
    when = datetime.datetime.fromtimestamp(run.modified).strftime("%Y-%m-%d %H:%M")
    parts = [
        f"**{run.name}**",
        f"last step {last}" if last is not None else "no step logged yet",
        f"{len(run.grids)} validation grid{'s' * (len(run.grids) != 1)}",
        f"{checkpoints} checkpoint{'s' * (checkpoints != 1)}" + (" and the final adapter" if finals else " (no final adapter yet)"),
        f"changed {when}",
    ]
    notes = "".join(f"\n- {note}" for note in run.notes)
    return " · ".join(parts) + notes


# --------------------------------------------------------------------------- readers


def _allowed_file(path: Path, guard: PathGuard) -> bool:
    return path.is_file() and guard.allows(path)


def _read_text(path: Path, guard: PathGuard, notes: list[str], what: str) -> str | None:
    """The file's text, or None with a note (missing files give no note)."""
    if not path.exists() and not path.is_symlink():
        return None
    if not _allowed_file(path, guard):
        notes.append(f"{what}: not read (not a file inside the runs folder)")
        return None
    try:
        if path.stat().st_size > MAX_TEXT:
            notes.append(f"{what}: larger than {MAX_TEXT >> 20} MiB, not read")
            return None
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        notes.append(f"{what}: not UTF-8 text")
    except OSError as error:
        notes.append(f"{what}: not readable ({error.strerror or type(error).__name__})")
    return None


def _read_config(folder: Path, guard: PathGuard, notes: list[str]) -> str:
    import yaml

    text = _read_text(folder / RUN_CONFIG, guard, notes, RUN_CONFIG)
    if text is None:
        return ""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        notes.append(f"{RUN_CONFIG}: not valid YAML (half-written?); shown as it is")
        return text
    if not isinstance(loaded, dict):
        notes.append(f"{RUN_CONFIG}: not a recipe (no keys); shown as it is")
    return text


def _read_history(folder: Path, guard: PathGuard, notes: list[str]) -> dict[str, list[tuple[int, float]]]:
    text = _read_text(folder / LOSS_HISTORY, guard, notes, LOSS_HISTORY)
    if text is None:
        return {}
    try:
        stored = json.loads(text)
    except ValueError:
        notes.append(f"{LOSS_HISTORY}: not JSON (half-written?); no curves")
        return {}
    if not isinstance(stored, dict):
        notes.append(f"{LOSS_HISTORY}: not a loss history; no curves")
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    dropped = 0
    for name, points in stored.items():
        kept = []
        for point in points if isinstance(points, list) else []:
            try:
                step, value = int(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError, KeyError):
                dropped += 1
                continue
            if math.isfinite(value):
                kept.append((step, value))
            else:
                dropped += 1
        if not isinstance(points, list):
            dropped += 1
        if kept:
            series[str(name)] = sorted(kept)
    if dropped:
        notes.append(f"{LOSS_HISTORY}: {dropped} point{'s' * (dropped != 1)} not numbers (or not finite) left out")
    return series


def _read_grids(folder: Path, guard: PathGuard) -> tuple[list[Grid], Path | None]:
    samples = folder / SAMPLES
    if not samples.is_dir() or samples.is_symlink() or not guard.allows(samples):
        return [], None
    grids = []
    for path in samples.iterdir():
        match = _GRID.match(path.name)
        if match and _allowed_file(path, guard):
            grids.append(Grid(int(match.group(1)), path.resolve()))
    base = samples / BASE_GRID
    return sorted(grids, key=lambda g: g.step), base.resolve() if _allowed_file(base, guard) else None


def _adapter_folder(folder: Path, guard: PathGuard) -> Path | None:
    """``folder`` when it is a complete PEFT adapter inside the allowed folders."""
    if folder.is_symlink() or not folder.is_dir() or not guard.allows(folder):
        return None
    if all(_allowed_file(folder / name, guard) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)):
        return folder.resolve()
    return None


def _read_adapters(folder: Path, guard: PathGuard) -> list[RunAdapter]:
    """The final adapter(s), then every complete checkpoint's adapter, latest first.

    A checkpoint being written lives under a hidden temporary name and appears
    once renamed into place, so any ``step-N`` folder with an adapter is listed.
    """
    found = []
    for name, label in ((ADAPTER_DIR, "final"), (RAW_ADAPTER_DIR, "final, before EMA")):
        if (path := _adapter_folder(folder / name, guard)) is not None:
            found.append(RunAdapter(label, path))
    root = folder / CHECKPOINTS
    if root.is_dir() and not root.is_symlink() and guard.allows(root):
        steps = []
        for entry in root.iterdir():
            match = _STEP.match(entry.name)
            if match and not entry.is_symlink() and (path := _adapter_folder(entry / ADAPTER_DIR, guard)) is not None:
                steps.append(RunAdapter(f"step {int(match.group(1))}", path, int(match.group(1))))
        found += sorted(steps, key=lambda a: -a.step)
    return found


def load_image(path: Path | None, guard: PathGuard, notes: list[str] | None = None):
    """A grid as an RGB PIL image, or None (with a note) when it is not a readable image inside the allowed folders."""
    from PIL import Image

    if path is None:
        return None
    if not _allowed_file(path, guard):
        if notes is not None:
            notes.append(f"{path.name}: not read (not a file inside the runs folder)")
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception:  # noqa: BLE001  (half-written, not a PNG, too large to decode: a note, never a failure)
        if notes is not None:
            notes.append(f"{path.name}: not a readable image (half-written?)")
        return None


def _modified(folder: Path) -> float:
    """The newest of the folder's and the trainer's regularly updated files' times."""
    times = []
    for path in (folder, folder / LOSS_HISTORY, folder / RUN_CONFIG, folder / CHECKPOINTS, folder / SAMPLES, folder / ADAPTER_DIR):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times)


