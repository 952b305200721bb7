"""Export an adapter to the layouts other tools load, or as a publish folder.

One file per target, because no single file serves every loader (see
``docs/adapters.md``): ComfyUI's core loader reads the original fused-qkv names or
``transformer.``-prefixed diffusers names; the original PixArt code (and city96's
ComfyUI_ExtraModels loader before its PEFT/OneTrainer rework) the original names
without prefix. Every file stores alpha as a one-element ``<module>.alpha`` tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image
from safetensors.torch import save_file

from pixart_tune.adapters import card as cards
from pixart_tune.adapters.layouts import LoraWeights, to_state_dict
from pixart_tune.adapters.loader import read_lora
from pixart_tune.adapters.merge import refuse_overwriting_inputs, write_weights
from pixart_tune.base import ADAPTER_WEIGHTS, REAL_MODEL_ID
from pixart_tune.errors import UserError
from pixart_tune.fsutil import atomic_path
from pixart_tune.hub import looks_like_path

# Export format -> (layout, which loader the file is for).
FORMATS: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "diffusers-style keys (`transformer.` prefix, lora_A/lora_B + alpha): ComfyUI core 'Load LoRA', diffusers-style scripts, pixart-tune"),
    "comfyui": ("comfyui", "ComfyUI core 'Load LoRA' in the original checkpoint names (`diffusion_model.blocks.N.attn.qkv`, fused q/k/v)"),
    "pixart": ("pixart", "the original PixArt code's names (`blocks.N.attn.qkv`, fused q/k/v), as city96's ComfyUI_ExtraModels PixArt loader read them up to its PEFT/OneTrainer rework; for ComfyUI today use `comfyui`"),
    "onetrainer": ("onetrainer", "OneTrainer and kohya-style tools (`lora_transformer_*`, lora_down/lora_up + alpha)"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

logger = logging.getLogger(__name__)


def export_file(weights: LoraWeights, fmt: str, out: str | Path) -> Path:
    """Writes ``weights`` in format ``fmt`` to the .safetensors file ``out``, atomically."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    layout, _ = FORMATS[fmt]
    state = to_state_dict(weights, layout)
    header = dict(weights.metadata)
    header.update(format="pt", pixart_tune_layout=layout)
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=header)
    return out


def export_adapter(
    path: str | Path, formats: Sequence[str], out: str | Path, allow_pickle: bool = False, name: str | None = None
) -> list[Path]:
    """Exports the adapter at ``path`` in each format; returns the files, in the order of ``formats``.

    ``out`` is the file when one format is asked for and ``out`` ends in
    ``.safetensors``; otherwise a folder receiving ``<name>_<format>.safetensors``.
    """
    weights = read_lora(path, allow_pickle)
    return [export_file(weights, fmt, target) for fmt, target in zip(formats, export_targets(path, formats, out, name))]


def export_targets(path: str | Path, formats: Sequence[str], out: str | Path, name: str | None = None) -> list[Path]:
    """The files :func:`export_adapter` writes (``name`` defaults to the adapter's file or folder name)."""
    out = Path(out)
    if len(formats) == 1 and out.suffix == ".safetensors":
        return [out]
    stem = name or _stem(Path(path))
    return [out / f"{stem}_{fmt}.safetensors" for fmt in formats]


def _stem(path: Path) -> str:
    return path.stem if path.is_file() else path.resolve().name


# --- the publish folder ------------------------------------------------------------------


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not a folder here: a recorded local path (even one gone since) is not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or looks_like_path(name) or name.count("/") != 1 or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def find_samples(adapter: Path) -> list[Path]:
    """Validation images next to a trained adapter: the newest grid of ``<run>/samples``."""
    run = adapter if adapter.is_dir() else adapter.parent
    for folder in (run / "samples", run.parent / "samples"):
        if folder.is_dir():
            # step-NNNNNN.png sort by step; base.png is the base model, not the adapter.
            images = sorted(p for p in folder.glob("step-*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                return images[-1:]
    return []


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    images: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            images += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
            images.append(item)
        else:
            raise UserError(f"sample {item} is not an image file or a folder of images")
    return images


def sample_prompt(image: Path, metadata: dict[str, str]) -> str:
    """The prompt of a sample: from its PNG text chunk, else the validation prompts, else the trigger words."""
    with Image.open(image) as handle:
        text = getattr(handle, "text", {}) or {}
    if "pixart-tune" in text:
        try:
            prompt = json.loads(text["pixart-tune"]).get("prompt")
            if prompt:
                return str(prompt)
        except json.JSONDecodeError:
            pass
    if text.get("parameters"):
        return text["parameters"].split("\n", 1)[0]
    values = cards.decoded(metadata)
    config = values.get("training_config")
    prompts = config.get("validation", {}).get("prompts") if isinstance(config, dict) else None
    if prompts:
        return "; ".join(map(str, prompts))
    words = values.get("trigger_words")
    if words:
        return ", ".join(words) if isinstance(words, list) else str(words)
    return image.stem.replace("_", " ")


def publish(
    path: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    base_model: str | None = None,
    trigger_words: Sequence[str] = (),
    license: str = "openrail++",
    tags: Sequence[str] = (),
    samples: Sequence[str | Path] | None = None,
    repo_id: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Writes a folder ready for the Hub: PEFT adapter, one file per ComfyUI loader, images, README.md."""
    path = Path(path)
    weights = read_lora(path, allow_pickle)
    values = cards.decoded(weights.metadata)
    name = name or _stem(path)
    recorded = values.get("base_model")
    if base_model is None:
        # A local folder (such as a test model) means nothing on the Hub.
        base_model = recorded if isinstance(recorded, str) and looks_like_hub_id(recorded) else REAL_MODEL_ID
        if base_model != recorded:
            logger.warning(
                "the adapter was trained on %r, which is not a Hub id; the model card names %s as its base "
                "(pass --base-model to name another)", recorded, base_model,
            )
    words = list(trigger_words) or [str(w) for w in (values.get("trigger_words") or []) if str(w)]
    images = _expand(samples) if samples is not None else find_samples(path)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_weights(weights, tmp / "peft")
        for item in (tmp / "peft").iterdir():
            item.rename(tmp / item.name)
        (tmp / "peft").rmdir()
        files = {ADAPTER_WEIGHTS: "PEFT / pixart-tune (with `adapter_config.json`)"}
        for fmt in ("comfyui", "pixart"):
            file = export_file(weights, fmt, tmp / f"{name}_{fmt}.safetensors")
            files[file.name] = FORMATS[fmt][1]
        shown = []
        if images:
            (tmp / "images").mkdir()
        for index, image in enumerate(images):
            target = tmp / "images" / f"sample_{index}{image.suffix.lower()}"
            shutil.copy2(image, target)
            shown.append(cards.Sample(f"images/{target.name}", sample_prompt(image, weights.metadata)))
        info = cards.CardInfo(
            name=name, base_model=base_model, license=license, trigger_words=words, tags=list(tags),
            samples=shown, metadata=weights.metadata, files=files, repo_id=repo_id,
        )
        cards.write_card(info, tmp)
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Uploads a publish folder to a Hub model repository (created when missing)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.whoami()
    except Exception as error:  # no token, expired token, or no network
        raise UserError(
            f"cannot reach the Hugging Face Hub as a logged-in user ({type(error).__name__}); run 'hf auth login' "
            "(or set HF_TOKEN) and try again; the publish folder is ready to upload by hand"
        ) from error
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload PixArt-Sigma LoRA (pixart-tune)")
    return f"https://huggingface.co/{repo_id}"


# --- the ``export`` verb ------------------------------------------------------------------


@dataclasses.dataclass
class ExportConfig:
    """What ``pixart-tune export`` writes: files in other tools' layouts, and/or a publish folder."""

    adapter: str
    """Adapter folder or .safetensors file, any supported layout."""
    format: str | None = None
    """Export format, or all (one file per format)."""
    out: str | None = None
    """Output .safetensors file, or a folder for format all."""
    publish: str | None = None
    """Write a publish folder: adapter, ComfyUI files, images, README.md."""
    name: str | None = None
    """Name of the adapter in file names and the card."""
    base_model: str | None = None
    """Hub id of the base model for the card (default: recorded in the adapter, else the PixArt-Sigma 1024 model)."""
    trigger: list[str] = dataclasses.field(default_factory=list)
    """Trigger words for the card (default: those recorded in the adapter)."""
    license: str = "openrail++"
    """License id for the model card (PixArt-Sigma's own license)."""
    tag: list[str] = dataclasses.field(default_factory=list)
    """Extra card tags."""
    samples: list[str] | None = None
    """Images or folders for the card (default: the newest validation grid of the run)."""
    push_to_hub: str | None = None
    """Upload the publish folder to this Hub repository (needs 'hf auth login')."""
    private: bool = False
    """Create the Hub repository as private."""
    overwrite: bool = False
    """Replace outputs that exist."""
    allow_pickle_runs_code: bool = False
    """Also read .bin/.pt/.ckpt files; unpickling can run any code in them."""

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in (*FORMATS, "all"):
            raise ValueError(f"format must be one of {', '.join((*FORMATS, 'all'))}, got {self.format!r}")


def export(config: ExportConfig) -> list[str]:
    """Runs ``config``; returns one line per thing written (or uploaded)."""
    if not config.publish and not config.format:
        raise UserError("choose --format FORMAT --out PATH, or --publish FOLDER")
    if config.push_to_hub and not config.publish:
        raise UserError("--push-to-hub uploads a publish folder: add --publish FOLDER")
    written = []
    if config.format:
        if not config.out:
            raise UserError("--format needs --out (a .safetensors file, or a folder for --format all)")
        formats = list(FORMATS) if config.format == "all" else [config.format]
        out = Path(config.out)
        if len(formats) == 1 and out.suffix and out.suffix != ".safetensors":
            raise UserError(f"--out {out}: exports are .safetensors files; name it {out.with_suffix('.safetensors').name}")
        _refuse_existing(export_targets(config.adapter, formats, out, config.name), config.overwrite, Path(config.adapter))
        for fmt, target in zip(formats, export_adapter(config.adapter, formats, out, config.allow_pickle_runs_code, config.name)):
            written.append(f"wrote {target}  ({FORMATS[fmt][1]})")
    if config.publish:
        folder = Path(config.publish)
        _refuse_existing([folder], config.overwrite, Path(config.adapter))
        publish(
            config.adapter, folder, name=config.name, base_model=config.base_model, trigger_words=config.trigger,
            license=config.license, tags=config.tag, samples=config.samples, repo_id=config.push_to_hub,
            allow_pickle=config.allow_pickle_runs_code,
        )
        written.append(f"wrote the publish folder {folder} (README.md, adapter, ComfyUI files, images)")
        if config.push_to_hub:
            written.append(f"uploaded to {push_to_hub(folder, config.push_to_hub, config.private)}")
    return written


def _refuse_existing(targets: Sequence[Path], overwrite: bool, adapter: Path) -> None:
    for target in targets:
        refuse_overwriting_inputs([adapter], target, "the input adapter")
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; choose another --out / --publish or pass --overwrite")
