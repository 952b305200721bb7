"""What the app does, apart from its widgets: settings, the loaded model, compare, sweep, merge.

Every action checks its inputs again here (model, adapter paths, output names),
whatever the page sent: the page's menus are a convenience, not a boundary.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Sequence

from pixart_tune.app.files import (
    PathGuard,
    adapter_label,
    discover_adapters,
    discover_models,
    group_by_run,
    output_path,
    unique,
)
from pixart_tune.errors import UserError
from pixart_tune.parts import use_components

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MERGE_METHODS = {
    "cat": "cat: concatenate (ranks add up, exact)",
    "svd": "svd: exact sum cut to a rank by SVD",
    "linear": "linear: weighted sum of A and B (same rank, approximate)",
    "fuse": "fuse: bake into the base model (full model folder)",
}
DEFAULT_METHOD = "cat"
MAX_SWEEP = 8
SWEEP_COLUMNS = 4
MAX_SEED = 2**32 - 1
STEPS = (1, 100)
GUIDANCE = (1.0, 15.0)
SCALES = (-2.0, 2.0)
"""The ranges the page's widgets offer; the actions refuse values outside them, whoever sent them."""
# owner/name on the Hugging Face hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

Progress = Callable[..., object]


@dataclasses.dataclass
class AppSettings:
    models: list[str]
    """Base models offered in the model menu: local pipeline folders or hub ids. The first one loads at start."""
    runs: Path
    """Folder searched (recursively) for adapters: PEFT folders and LoRA ``.safetensors`` files."""
    components: str | None = None
    """Where the VAE, T5, tokenizer and scheduler come from for a startup model that is a
    transformer alone (a pipeline folder or hub id); default: its family's."""
    outputs: Path | None = None
    """Where merged adapters and fused models are written; ``<runs>/merged`` when not given."""
    allow: list[Path] = dataclasses.field(default_factory=list)
    """More folders the app may read adapters and models from."""
    host: str = DEFAULT_HOST
    """Interface to bind; the default serves this computer only."""
    port: int = DEFAULT_PORT
    """Port to serve on (0: any free port)."""
    share: bool = False
    """Ask Gradio for a public share link (off unless asked)."""
    allow_hub: bool = False
    """Accept hub ids typed into the model menu (they download into the hub cache)."""
    device: str | None = None
    """Torch device for generation; the sampler picks one when not given."""
    dtype: str = "auto"
    """Weights dtype for generation (auto, fp32, bf16, fp16)."""

    def __post_init__(self) -> None:
        self.models = [str(m).strip() for m in self.models if str(m).strip()]
        if not self.models:
            raise UserError("give at least one base model (--model FOLDER_OR_HUB_ID)")
        self.runs = Path(self.runs).expanduser().resolve()
        self.outputs = Path(self.outputs).expanduser().resolve() if self.outputs else self.runs / "merged"
        self.allow = [Path(p).expanduser().resolve() for p in self.allow]
        if not self.runs.is_dir():
            raise UserError(f"runs folder {self.runs} does not exist; pass --runs with the folder your training runs write to")
        for folder in self.allow:
            if not folder.is_dir():
                raise UserError(f"--allow {folder}: no such folder")
        if not 0 < self.port < 65536:
            raise UserError(f"port must be between 1 and 65535, got {self.port}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")

    @property
    def local_models(self) -> list[Path]:
        """The startup models that are local folders, resolved."""
        return [Path(m).expanduser().resolve() for m in self.models if Path(m).expanduser().is_dir()]

    @property
    def roots(self) -> list[Path]:
        """Every folder the app may read from; it writes only into ``outputs``."""
        components = [Path(self.components)] if self.components and Path(self.components).is_dir() else []
        return unique([self.runs, self.outputs, *self.allow, *self.local_models, *components])


def parse_bucket(value: str) -> tuple[int, int]:
    """``"HxW"`` -> (height, width)."""
    try:
        height, width = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise UserError(f"size {value!r} is not HEIGHTxWIDTH; pick a size from the list") from None
    return height, width


def parse_scales(text: str) -> list[float]:
    """``"0, 0.5, 1"`` -> [0.0, 0.5, 1.0]; between 2 and MAX_SWEEP values, each within SCALES."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    try:
        scales = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"scales {text!r}: write numbers separated by commas, e.g. 0, 0.5, 1, 1.5") from None
    if not 2 <= len(scales) <= MAX_SWEEP:
        raise UserError(f"give between 2 and {MAX_SWEEP} scales for a sweep, separated by commas, got {len(scales)}")
    for value in scales:
        check_range("sweep scale", value, *SCALES)
    return scales


def check_range(what: str, value, low: float, high: float, whole: bool = False) -> float:
    """``value`` as a number within [low, high]; a one-line UserError naming the range otherwise."""
    span = f"{low:g} to {high:g}" if not whole else f"{int(low)} to {int(high)}"
    kind = "a whole number" if whole else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} is empty or not a number: write {kind} from {span}") from None
    if not math.isfinite(number) or not low <= number <= high or whole and number != int(number):
        shown = value if isinstance(value, int) else f"{number:g}"
        raise UserError(f"{what} {shown} is out of range: write {kind} from {span}")
    return int(number) if whole else number


def check_inputs(seed, steps, guidance, scales: Sequence = ()) -> tuple[int, int, float, list[float]]:
    """(seed, steps, guidance, scales) within the page's ranges, or a UserError saying the range."""
    return (
        check_range("seed", seed, 0, MAX_SEED, whole=True),
        check_range("steps", steps, *STEPS, whole=True),
        check_range("guidance", guidance, *GUIDANCE),
        [check_range("adapter scale", s, *SCALES) for s in scales],
    )


def bucket_choices(buckets: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
    """Menu entries (``"W × H (aspect)"``, ``"HxW"``) for (height, width) buckets."""
    return [(f"{w} × {h}  ({w / h:.2f})", f"{h}x{w}") for h, w in buckets]


def square_bucket(buckets: Sequence[tuple[int, int]]) -> str:
    h, w = min(buckets, key=lambda hw: abs(hw[1] / hw[0] - 1.0))
    return f"{h}x{w}"


class ModelHolder:
    """Keeps one loaded ``Sampler`` (the current base model) between generations.

    Only one: a real PixArt-Sigma pipeline with its T5 encoder takes many
    gigabytes, so switching models releases the previous one first. The lock
    serialises everything that touches the loaded model (adapters live inside it).
    """

    def __init__(self, device: str | None, dtype: str):
        self.device, self.dtype = device, dtype
        self.lock = threading.RLock()
        self._model: str | None = None
        self._sampler = None

    def get(self, model: str):
        from pixart_tune.sampling import Sampler

        with self.lock:
            if self._model != model:
                if self._sampler is not None:
                    self._model, self._sampler = None, None
                    _release_memory()
                self._sampler = Sampler(model, device=self.device, dtype=self.dtype)
                self._model = model
            return self._sampler

    @property
    def loaded(self) -> str | None:
        return self._model


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _silent(*args, **kwargs) -> None:
    return None


class PreviewApp:
    """The app's state and actions, independent of the widgets that call them."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        for model in settings.models:  # a transformer alone takes its VAE, T5 ... from here
            use_components(model, settings.components)
        self.guard = PathGuard(settings.roots)
        self.holder = ModelHolder(settings.device, settings.dtype)
        # Two browser tabs merging to one name: the second must find the first's
        # output and be refused, not replace it between the check and the write.
        self._writing = threading.Lock()

    def label(self, path: str | Path) -> str:
        return adapter_label(path, self.guard.roots)

    # ---- menus

    def adapter_choices(self, extra: Sequence[str] = ()) -> list[tuple[str, str]]:
        """(label, path) of the adapters in the runs and outputs folders, plus ``extra`` ones.

        A training run's adapters are together: its final adapter, then its
        checkpoints, latest first ("style-a / final", "style-a / step 500").
        """
        s = self.settings
        paths = discover_adapters([s.runs, s.outputs], self.guard)
        paths += [Path(p) for p in extra if self.guard.allows(p) and Path(p).exists()]
        return [(self.label(p), str(p)) for p in group_by_run(unique(paths))]

    def adapters_note(self, choices: Sequence | None = None) -> str:
        """What to do when no adapter was found (empty when some were)."""
        if choices is None:
            choices = self.adapter_choices()
        if choices:
            return ""
        return (
            f"No adapters yet. The app finds them in the runs folder `{self.settings.runs}` (and merges in `{self.settings.outputs}`): "
            f"train one into it with `pixart-tune train RECIPE.yaml output_dir={self.settings.runs}/my-style`, "
            "or copy an adapter folder or `.safetensors` file there, then press **Rescan folders**."
        )

    def model_choices(self) -> list[tuple[str, str]]:
        """The startup models, then the fused models found in the outputs folder."""
        fused = [(self.label(p), str(p)) for p in discover_models(self.settings.outputs, self.guard)]
        return [(m, m) for m in self.settings.models] + [c for c in fused if c[1] not in self.settings.models]

    # ---- checks

    def check_model(self, model: str) -> str:
        """A base model the app may load: a startup model, or a pipeline folder under the allowed folders."""
        model = str(model or "").strip()
        if model in self.settings.models:
            return model
        if not model:
            raise UserError("choose a base model")
        local = Path(model).expanduser()
        if local.is_absolute() or local.exists() or not _HUB_ID.fullmatch(model):
            folder = self.guard.check(model, "model folder")
            if not (folder / "model_index.json").is_file():
                raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
            # Its files are read, and fusing copies them into the outputs folder, which
            # the page serves: a link inside it must not lead out of the allowed folders.
            for file in folder.rglob("*"):
                if file.is_symlink():
                    self.guard.check(file, "file of the model folder")
            return str(folder)
        if not self.settings.allow_hub:
            raise UserError(
                f"hub id {model!r} was not given at start; restart the app with --model {model} (or --allow-hub to accept typed hub ids)"
            )
        return model

    def check_adapter(self, path: str | Path) -> Path:
        from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        resolved = self.guard.check(path, "adapter")
        if resolved.is_dir():
            if not (resolved / ADAPTER_WEIGHTS).is_file() or not (resolved / ADAPTER_CONFIG).is_file():
                raise UserError(f"{resolved} is not an adapter folder (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
            # The folder is inside; its files may still be links that lead out of it.
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                self.guard.check(resolved / name, "adapter file")
        elif resolved.suffix != ".safetensors":
            raise UserError(f"{resolved.name}: the app reads only .safetensors adapters (pickle files can run code)")
        return resolved

    def specs(self, paths: Sequence[str], scales: Sequence[float]):
        from pixart_tune.sampling import AdapterSpec

        if len(paths) != len(scales):
            raise UserError(f"{len(paths)} adapters but {len(scales)} scales; reselect the adapters")
        return [AdapterSpec(str(self.check_adapter(p)), float(s)) for p, s in zip(paths, scales)]

    # ---- actions

    def compare(self, model, prompt, negative, seed, steps, guidance, bucket, paths, scales, progress: Progress = _silent):
        """(base image, adapted image, or None without adapters) for one prompt and seed."""
        *_, last = self.compare_steps(model, prompt, negative, seed, steps, guidance, bucket, paths, scales, progress)
        return last

    def compare_steps(self, model, prompt, negative, seed, steps, guidance, bucket, paths, scales, progress: Progress = _silent):
        """Yields (base, None) as soon as the base image is drawn, then (base, adapted) (nothing more without adapters).

        ``progress(fraction, desc="base model: step 7/20")`` after every denoising step.
        """
        if not str(prompt or "").strip():
            raise UserError("write a prompt first")
        seed, steps, guidance, scales = check_inputs(seed, steps, guidance, scales)
        height, width = parse_bucket(bucket)
        specs = self.specs(paths, scales)
        parts = [("base model", [])] + ([("with adapters", specs)] if specs else [])
        images = []
        with self.holder.lock:
            progress(0.0, desc="loading the base model")
            sampler = self.holder.get(self.check_model(model))
            for index, (name, adapters) in enumerate(parts):
                def on_step(done, total, index=index, name=name):
                    progress((index + done / total) / len(parts), desc=f"{name}: step {done}/{total}")

                images += sampler.generate([prompt], [seed], adapters, negative_prompt=negative or "", steps=steps, guidance=guidance,
                                           height=height, width=width, on_step=on_step)
                yield images[0], (images[1] if len(images) > 1 else None)

    def sweep(self, model, prompt, negative, seed, steps, guidance, bucket, paths, scales, swept, values, progress: Progress = _silent):
        """A grid of the swept adapter at each scale (rows of SWEEP_COLUMNS), the other adapters at their own scale.

        ``progress(fraction, desc="scale 1.5: step 9/20")`` after every denoising step.
        """
        from pixart_tune.sampling import comparison_rows, draw_comparison, tile_grid

        if not paths:
            raise UserError("select at least one adapter, then choose which one to sweep")
        if swept not in paths:
            raise UserError("choose which of the selected adapters to sweep")
        if not str(prompt or "").strip():
            raise UserError("write a prompt first")
        values = parse_scales(values)
        seed, steps, guidance, scales = check_inputs(seed, steps, guidance, scales)
        height, width = parse_bucket(bucket)
        specs = self.specs(paths, scales)
        index = list(paths).index(swept)
        # The sample verb's rows: the first adapter swept, the others as they are.
        rows = comparison_rows([specs[index], *specs[:index], *specs[index + 1 :]], values, base=False, separately=False)

        def on_step(image, done, total):
            progress((image + done / total) / len(values), desc=f"scale {values[image]:g}: step {done}/{total}")

        with self.holder.lock:
            progress(0.0, desc="loading the base model")
            sampler = self.holder.get(self.check_model(model))
            drawn = draw_comparison(sampler, rows, [(prompt, seed)], negative_prompt=negative or "", steps=steps, guidance=guidance,
                                    height=height, width=width, on_step=on_step)
        # Labels must fit a tile: drop the root folder's name, keep the end.
        name = self.label(swept).split("/", 1)[-1][-24:]
        return tile_grid([row[0] for row in drawn], [f"{name} x{v:g}" for v in values], max_cols=SWEEP_COLUMNS)

    def merge(self, model, paths, weights, method, rank, name, progress: Progress = _silent) -> Path:
        """Writes a merged adapter (or, for ``fuse``, a full model folder) into the outputs folder."""
        return self.merge_noted(model, paths, weights, method, rank, name, progress)[0]

    def merge_noted(self, model, paths, weights, method, rank, name, progress: Progress = _silent) -> tuple[Path, list[str]]:
        """:meth:`merge`, with notes on what was adjusted (an svd rank above what the adapters hold)."""
        from pixart_tune.adapters.merge import MixedRanks, fuse_adapters, merge_adapters

        if method not in MERGE_METHODS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
        if not paths:
            raise UserError("choose the adapters to merge")
        if method != "fuse" and len(paths) < 2:
            raise UserError("choose at least two adapters to merge (or the method 'fuse' to bake one into the base model)")
        weights = [check_range("weight", w, *SCALES) for w in weights]
        notes = []
        specs = self.specs(paths, weights)
        if method == "svd":
            rank = check_range("svd rank", rank, 1, 10**9, whole=True) if rank is not None else None
            if rank is None:
                raise UserError("svd rank is empty: write a whole number from 1 up (svd needs a rank)")
            combined = self.combined_rank(specs)
            if combined and rank > combined:
                notes.append(f"svd rank {rank} is above the adapters' combined rank {combined}: using {combined} (exact)")
                rank = combined
        with self._writing:
            out = output_path(self.settings.outputs, name)
            if method == "fuse":
                progress(0.1, desc="fusing into the base model")
                # Fusing loads a second copy of the transformer: keep it from running beside a generation.
                with self.holder.lock:
                    written = fuse_adapters(self.check_model(model), specs, out)
            else:
                progress(0.1, desc=f"merging ({method})")
                try:
                    written = merge_adapters(specs, out, method=method, rank=rank if method == "svd" else None)
                except MixedRanks as error:
                    raise UserError(f"linear merging needs adapters of the same rank (these have ranks {error.ranks}): "
                                    'pick "cat" (exact) or "svd" in the Method list') from None
        progress(1.0, desc="done")
        return Path(written), notes

    def combined_rank(self, specs) -> int:
        """The largest sum of ranks over the layers the adapters change: the rank of an exact (cat) merge."""
        from pixart_tune.adapters.loader import read_lora

        totals: dict[str, int] = {}
        for spec in specs:
            for layer, module in read_lora(spec.path).modules.items():
                totals[layer] = totals.get(layer, 0) + module.rank
        return max(totals.values(), default=0)

    def download(self, out: Path) -> Path | None:
        """The merge's weights as ``<name>.safetensors`` for the download button: a link (or copy) in a hidden folder of the outputs.

        The PEFT folder keeps its own file name, which loaders expect.
        """
        from pixart_tune.adapters.merge import LYCORIS_FILE
        from pixart_tune.base import ADAPTER_WEIGHTS

        source = next((out / f for f in (ADAPTER_WEIGHTS, LYCORIS_FILE) if (out / f).is_file()), None)
        if source is None:
            return None
        target = self.settings.outputs / ".downloads" / out.name / f"{out.name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        return target
