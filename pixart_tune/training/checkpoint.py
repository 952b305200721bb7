"""Resumable training checkpoints, written so that no crash can leave a broken one.

A checkpoint is the folder ``OUTPUT_DIR/checkpoints/step-NNNNNN/``::

    adapter/            the LoRA so far (PEFT layout; loads like any adapter)
    optimizer.pt        optimizer state
    lr_scheduler.pt     LR schedule state
    rng.pt              torch / CUDA / numpy / python RNG states of every rank
    state.json          step, epoch and batch position in the epoch (data order)
    grad_scaler.pt      fp16 runs only: the loss scale, so a resumed run does not
                        start again from 65536 and skip its first steps
    ema.pt              runs with ema.enabled only: the fp32 EMA shadow
    config.yaml         the resolved recipe

The folder is written under a temporary name and renamed into place once complete
(``fsutil.atomic_path``), so a kill -9 or a full disk leaves either a complete
checkpoint or none. Old checkpoints are removed only after a newer one is complete,
and by renaming them out of the ``step-*`` namespace first.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixart_tune.adapters.layouts import LoraWeights
from pixart_tune.adapters.loader import read_lora
from pixart_tune.adapters.lora import LoraSettings, save_adapter
from pixart_tune.base import CHECKPOINTS, RUN_CONFIG
from pixart_tune.config import save_yaml, to_dict
from pixart_tune.errors import UserError
from pixart_tune.fsutil import atomic_path

MAX_STEP = 10**9
"""Beyond any run's step count (reading a whole loss history)."""
_NAME = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.step-\d+\.(.+\.tmp|deleting|old)$")
logger = logging.getLogger(__name__)
_FILES = ("optimizer.pt", "lr_scheduler.pt", "rng.pt", "state.json", "adapter/adapter_model.safetensors")


@dataclasses.dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of ``epoch`` this rank has trained on (the data order position)."""


@dataclasses.dataclass
class Checkpoint:
    path: Path
    state: TrainState
    adapter: LoraWeights
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: list[dict[str, Any]]
    grad_scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    """Every RNG the training process draws from (LoRA dropout uses torch's global one)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": json.dumps(random.getstate()),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _FILES)


def save_checkpoint(
    output_dir: str | Path,
    *,
    transformer: torch.nn.Module,
    lora: LoraSettings,
    metadata: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    state: TrainState,
    rng: list[dict[str, Any]],
    config: Any,
    keep_last: int,
    grad_scaler: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
) -> Path:
    """Writes ``step-NNNNNN`` atomically, then prunes to the newest ``keep_last``.

    When the disk looks too small for one more checkpoint (less free than the last
    one took), the oldest is pruned first, so ``keep_last`` can make room; one
    complete checkpoint is always kept until the new one is complete.
    """
    target = checkpoint_root(output_dir) / f"step-{state.step:06d}"
    if keep_last > 1 and _short_of_space(output_dir):
        prune(output_dir, keep_last - 1)
    try:
        with atomic_path(target) as tmp:
            tmp.mkdir()
            save_adapter(transformer, tmp / "adapter", lora, metadata)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            if grad_scaler is not None:
                torch.save(grad_scaler, tmp / "grad_scaler.pt")
            if ema is not None:
                torch.save(ema, tmp / "ema.pt")
            save_yaml(config, tmp / RUN_CONFIG)
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")
    except Exception as error:
        if is_disk_full(error):
            kept = list_checkpoints(output_dir)
            last = f"the last complete checkpoint, {kept[-1]}, is intact" if kept else "no earlier checkpoint exists"
            raise UserError(
                f"the disk is full: could not write checkpoint {target.name} ({error}); {last}. "
                "Free some space (or lower checkpoint.keep_last) and run again with --resume"
            ) from None
        raise
    prune(output_dir, keep_last)
    return target


def _short_of_space(output_dir: str | Path) -> bool:
    kept = list_checkpoints(output_dir)
    if not kept:
        return False
    size = sum(f.stat().st_size for f in kept[-1].rglob("*") if f.is_file())
    try:
        free = shutil.disk_usage(checkpoint_root(output_dir)).free
    except OSError:
        return False
    return free < 1.2 * size


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Removes all but the newest ``keep_last`` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        # Renamed first: a kill during rmtree then leaves a hidden leftover, never a
        # half-deleted folder that looks like a checkpoint.
        doomed = old.with_name(f".{old.name}.deleting")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_stale(output_dir: str | Path) -> list[str]:
    """Removes what an interrupted run left in checkpoints/: half-written ``.step-*.tmp``
    folders (a kill -9 mid-save) and ``.step-*.deleting`` / ``.old`` ones (mid-prune)."""
    root = checkpoint_root(output_dir)
    stale = sorted(p for p in root.glob(".step-*") if _STALE.match(p.name)) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if stale:
        logger.warning("removed %d unfinished checkpoint folder(s) left by an interrupted run in %s", len(stale), root)
    return [p.name for p in stale]


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """The checkpoint folder ``--resume`` names: ``latest`` or a path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume latest: no checkpoint under {checkpoint_root(output_dir)}; "
                "check output_dir, or start without --resume"
            )
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder; pass a step-NNNNNN folder or 'latest'")
    if not is_complete(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint (needs {', '.join(_FILES)})")
    return path


def load_latest(output_dir: str | Path) -> Checkpoint:
    """The newest checkpoint that loads; a damaged newer one is passed over with a warning."""
    found = list_checkpoints(output_dir)
    for index, path in enumerate(reversed(found)):
        try:
            checkpoint = load_checkpoint(path)
        except UserError as error:
            if index == len(found) - 1:
                raise UserError(f"{error}; no intact checkpoint is left: start again in a new output_dir") from None
            logger.warning("%s; resuming from the newest intact one before it", error)
            continue
        return checkpoint
    raise UserError(f"--resume latest: no checkpoint under {checkpoint_root(output_dir)}; check output_dir, or start without --resume")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder; a damaged or tampered one is refused naming the file."""
    path = Path(path)
    try:
        return _load(path)
    except UserError as error:
        raise UserError(f"checkpoint {path} is damaged ({error})") from None
    except Exception as error:  # torch.load, json and safetensors each raise their own classes
        text = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(f"checkpoint {path} is damaged ({type(error).__name__}: {text})") from None


def check_same_lora(checkpoint: Checkpoint, lora: LoraSettings) -> None:
    """Refuses to resume a checkpoint with other LoRA settings than it was trained with (its config.yaml says which)."""
    import yaml

    try:
        saved = yaml.safe_load((checkpoint.path / RUN_CONFIG).read_text(encoding="utf-8"))["lora"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return  # an older checkpoint without its recipe: the weights' shapes are checked on loading
    wanted = to_dict(lora)
    differ = [f"lora.{key}={saved[key]!r} (recipe: {wanted[key]!r})" for key in wanted if key in saved and saved[key] != wanted[key]]
    if differ:
        raise UserError(
            f"checkpoint {checkpoint.path} was trained with {', '.join(differ)}; resume with the checkpoint's lora "
            "settings, or start the new settings in another output_dir"
        )


def _state(path: Path) -> TrainState:
    """state.json, checked against the folder it sits in (a step edited by hand would resume at the wrong place)."""
    data = json.loads((path / "state.json").read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(TrainState)}
    if not isinstance(data, dict) or set(data) != fields or not all(type(v) is int and v >= 0 for v in data.values()):
        raise UserError(f"state.json holds {str(data)[:80]}, not {', '.join(sorted(fields))} as counts")
    match = _NAME.match(path.name)
    if match and int(match.group(1)) != data["step"]:
        raise UserError(f"state.json says step {data['step']}, the folder is step {int(match.group(1))}")
    return TrainState(**data)


def _load(path: Path) -> Checkpoint:
    state = _state(path)
    adapter = read_lora(path / "adapter")
    return Checkpoint(
        path=path,
        state=state,
        adapter=adapter,
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        lr_scheduler=torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        grad_scaler=torch.load(path / "grad_scaler.pt", weights_only=True) if (path / "grad_scaler.pt").is_file() else None,
        ema=torch.load(path / "ema.pt", map_location="cpu", weights_only=True) if (path / "ema.pt").is_file() else None,
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the quota) is full, however the writer wrapped it."""
    # torch.save and safetensors report the OS error inside their own exception text;
    # torch.save's PytorchStreamWriter says only "file write failed" or "unexpected pos N vs M".
    for _ in range(8):  # the exception and what it was raised from
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(words in text for words in _DISK_FULL_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed", "unexpected pos")
