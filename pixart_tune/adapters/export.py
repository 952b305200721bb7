"""Export an adapter to the layouts other tools load, or as a publish folder.

One file per target, because no single file serves every loader (see
``docs/adapters.md``). In ComfyUI, the core LoRA loader reads the ``comfyui`` file
(original fused-qkv names under ``diffusion_model.``) exactly, on a PixArt model
loaded by ComfyUI itself or by city96's ComfyUI_ExtraModels "PixArt Checkpoint
Loader"; city96's own "PixArt Load LoRA" node reads the ``onetrainer`` file (see
:func:`city96_ready` for what it applies). Every file stores alpha as a one-element
``<module>.alpha`` tensor, and nothing written here carries a local path: the
header's paths become folder or file names (:func:`public_metadata`).

LyCORIS adapters (LoKr, LoHa, alone or beside LoRA modules) export under ``comfyui``
and ``diffusers`` in the LyCORIS tensor names ComfyUI core reads (``lokr_w1`` ...,
``hada_w1_a`` ..., with ``alpha``; :func:`pixart_tune.adapters.lycoris.to_comfyui_state`).
``onetrainer`` and ``pixart`` hold plain LoRA only and refuse them, naming the formats
that can, and ``merge --method svd --rank R``, which turns them into a LoRA (an
approximation the user asks for, never done silently). A publish folder of a LyCORIS
adapter carries the ``comfyui`` and ``diffusers`` files and no PEFT folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from pixart_tune.adapters import card as cards
from pixart_tune.adapters.layouts import LoraModule, LoraWeights, to_state_dict
from pixart_tune.adapters.loader import read_lora
from pixart_tune.adapters.merge import flat_state, write_weights
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, REAL_MODEL_ID
from pixart_tune.errors import UserError
from pixart_tune.fsutil import atomic_path, files_into, refuse_unsafe_outputs
from pixart_tune.generation import save_png
from pixart_tune.hub import looks_like_path

# Export format -> (layout, what loads it). "city96" is the "PixArt Load LoRA" node of
# city96's ComfyUI_ExtraModels (PixArt/lora.py @193c2fd, the newest); what it does
# with each file was found by running its code on them (tests/test_city96.py).
FORMATS: dict[str, tuple[str, str]] = {
    "diffusers": (
        "diffusers",
        (
            "ComfyUI core 'Load LoRA' on a PixArt model from ComfyUI's own loaders (exact), diffusers-style scripts, "
            "pixart-tune; city96's 'PixArt Load LoRA' raises KeyError on it unless adaln_single.linear is trained, "
            "and then takes alpha from a JSON beside the file (else 8) and skips self-attention q/k/v and cross-attention k/v"
        ),
    ),
    "comfyui": (
        "comfyui",
        (
            "ComfyUI core 'Load LoRA' / LoraLoaderModelOnly (exact), on PixArt loaded by ComfyUI's own loaders or by "
            "city96's 'PixArt Checkpoint Loader'; city96's 'PixArt Load LoRA' raises on it (Unable to detect model depth)"
        ),
    ),
    "pixart": (
        "pixart",
        (
            "the original PixArt checkpoint names without a prefix (blocks.N.attn.qkv); no current ComfyUI loader reads "
            "them (city96's 'PixArt Load LoRA' did before June 2024 and raises since); in ComfyUI use comfyui"
        ),
    ),
    "onetrainer": (
        "onetrainer",
        (
            "OneTrainer (lora_transformer_*, exact); city96's 'PixArt Load LoRA' loads it whatever was trained: exact on "
            "cross-attention q, both attention outputs, feed-forward and the layers outside the blocks, while ComfyUI "
            "0.1.1+ skips self-attention q/k/v and cross-attention k/v ('ERROR lora ... attn.qkv'; 1/3 and 1/2 strength "
            "before 0.1.1), so prefer the comfyui file with the core loader; ComfyUI core ignores this file for PixArt"
        ),
    ),
}
PEFT_FILE_NOTE = (
    "PEFT / pixart-tune (with adapter_config.json); city96's 'PixArt Load LoRA' raises KeyError on it unless "
    "adaln_single.linear is trained, and then skips self-attention q/k/v and cross-attention k/v"
)
# The exports a publish folder carries beside the PEFT adapter: one per ComfyUI LoRA node.
PUBLISHED_FORMATS = ("comfyui", "onetrainer")
# Those of a LyCORIS adapter (no PEFT folder: it may need several PEFT configs).
LYCORIS_FORMATS = ("comfyui", "diffusers")
LYCORIS_ADVICE = (
    "export it with --format comfyui (ComfyUI core's LoRA loaders) or --format diffusers, or turn it into a plain LoRA "
    "first with 'pixart-tune merge ADAPTER --method svd --rank R --out FOLDER'"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

logger = logging.getLogger(__name__)


def export_file(weights: LoraWeights, fmt: str, out: str | Path) -> Path:
    """Writes ``weights`` in format ``fmt`` to the .safetensors file ``out``, atomically.

    The header keeps the adapter's metadata, with local paths made names.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    layout, _ = FORMATS[fmt]
    if fmt not in LYCORIS_FORMATS:
        weights.check_lora_only(f"the {fmt} format", LYCORIS_ADVICE)
    if fmt == "onetrainer":
        weights = city96_ready(weights)
    state = flat_state(weights, layout) if weights.lycoris else to_state_dict(weights, layout)
    header = public_metadata(weights.metadata)
    header.update(format="pt", pixart_tune_layout=layout)
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=header)
    return out


# --- city96's ComfyUI_ExtraModels ---------------------------------------------------------

# The attention layers city96's loader needs in every block, grouped as it fuses them.
_CITY96_GROUPS = (
    ("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out.0",), ("attn2.to_q",), ("attn2.to_k", "attn2.to_v"), ("attn2.to_out.0",),
)
_BLOCK_INDEX = re.compile(r"transformer_blocks\.(\d+)\.")


def city96_ready(weights: LoraWeights) -> LoraWeights:
    """The same update, arranged so city96's "PixArt Load LoRA" node loads it from OneTrainer names.

    That loader (``PixArt/diffusers_convert.py``, ``convert_lora_state_dict``) counts
    the blocks by their ``attn1.to_k`` LoRAs and then requires attn1 and attn2
    ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` in each of them (a KeyError
    otherwise); it stacks the up matrices of q, k, v (and of cross-attention k, v),
    so they must share a rank; and it passes alpha on only for the layers outside
    the blocks and, per fused layer, the ``attn1.to_q`` (``attn2.to_k``) one, so every
    other layer gets scale 1. Hence, all exact for any reader of the layout:

    - each module's scale is folded into its up matrix and alpha = rank;
    - attention layers the adapter lacks, in blocks 0 to its last, are zero LoRAs;
    - the parts of a fused group are zero-padded to the group's largest rank.

    What no file can fix: city96's code for the fused self-attention q/k/v and
    cross-attention k/v ran only on ComfyUI before 0.1.1 (at 1/3 and 1/2 strength:
    it divides alpha by the stacked rank); since then ComfyUI applies the patches
    itself and logs a shape error for those two layers of each block.
    """
    weights.check_plain("city96's ComfyUI_ExtraModels loader")
    modules = {name: LoraModule(m.down, m.up * m.scale, float(m.rank)) for name, m in weights.modules.items()}
    blocks = [int(match.group(1)) for name in modules if (match := _BLOCK_INDEX.match(name))]
    width = _hidden_size(modules)
    for block in range(max(blocks, default=0) + 1):
        for group in _CITY96_GROUPS:
            names = [f"transformer_blocks.{block}.{part}" for part in group]
            rank = max((modules[name].rank for name in names if name in modules), default=1)
            for name in names:
                module = modules.get(name)
                if module is not None and module.rank == rank:
                    continue
                down = torch.zeros(rank, module.down.shape[1] if module else width)
                up = torch.zeros(module.up.shape[0] if module else width, rank)
                if module is not None:
                    down[: module.rank] = module.down.float()
                    up[:, : module.rank] = module.up.float()
                modules[name] = LoraModule(down, up, float(rank))
    return dataclasses.replace(weights, modules=modules)


def _hidden_size(modules: dict[str, LoraModule]) -> int:
    """The transformer's width, read off a LoRA's shapes (every attention layer is width x width)."""
    for name, module in modules.items():
        if module.down.ndim != 2:
            if name == "pos_embed.proj":
                return module.up.shape[0]
            continue
        if re.search(r"attn[12]\.|ff\.net\.0\.proj$|adaln_single\.linear$|proj_out$", name):
            return module.down.shape[1]
        if name.endswith(("ff.net.2", "caption_projection.linear_2", "timestep_embedder.linear_2")):
            return module.up.shape[0]
    raise UserError("cannot tell the transformer's width from this LoRA (no attention, feed-forward or output layer)")


# --- names, not local paths ---------------------------------------------------------------

# Keys (of the header, the training config, merge records) whose values name a model or a file.
_REFERENCE_KEYS = ("base_model", "model", "path", "output_dir", "init_adapter", "resized_from", "merged_from", "source", "out")
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
# A path inside free text: /, ~/ or C:\ not preceded by a letter, digit, dot, colon or slash.
_PATH_IN_TEXT = re.compile(r"(?<![\w.:/\\])(?:~|[A-Za-z]:)?[/\\][^\s,;'\"\])}]+")


def is_local_path(text: str, reference: bool = False) -> bool:
    """Absolute (``/``, ``~``, ``C:\\``, ``\\\\server``), or with ``reference`` (the value names a model
    or file) any path-like text (``./tiny``, ``runs/a/adapter``) that is not a Hub id."""
    if "://" in text or "\n" in text:
        return False
    if text.startswith(("/", "~")) or _WINDOWS_PATH.match(text):
        return True
    return reference and (looks_like_path(text) or "\\" in text) and not looks_like_hub_id(text)


def local_name(text: str) -> str:
    """The last component of a path (``/home/me/models/tiny/`` -> ``tiny``)."""
    parts = [part for part in re.split(r"[\\/]", text) if part not in ("", ".", "..", "~")]
    return parts[-1] if parts else "."


def public_value(value: Any, reference: bool = False) -> Any:
    """``value`` (decoded JSON) with every local path replaced by its name."""
    if isinstance(value, str):
        return local_name(value) if is_local_path(value, reference) else value
    if isinstance(value, list):
        return [public_value(item, reference) for item in value]
    if isinstance(value, dict):
        return {public_value(key): public_value(item, reference or key in _REFERENCE_KEYS) for key, item in value.items()}
    return value


def public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A safetensors header fit to publish: local paths, also inside JSON values, replaced by names.

    The trainer records ``base_model`` and the training config as given (a model
    folder, the datasets, the output folder), ``merge`` the adapters it merged;
    Hub ids stay as they are.
    """
    out = {}
    for key, text in metadata.items():
        value = _json_or_none(text)
        if value is None:
            out[key] = public_value(text, key in _REFERENCE_KEYS)
            continue
        public = public_value(value, key in _REFERENCE_KEYS)
        out[key] = text if public == value else json.dumps(public)
    return out


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def copy_public_image(source: Path, target: Path) -> None:
    """Copies a sample image; a PNG's text chunks (generation parameters) lose their local paths.

    pixart-tune's own PNGs are written again from their ``pixart-tune`` JSON; other
    chunks keep their text, with paths inside it made names.
    """
    if source.suffix.lower() != ".png":
        shutil.copy2(source, target)
        return
    with Image.open(source) as handle:
        text = dict(getattr(handle, "text", {}) or {})
        image = handle.copy()
    parameters = _json_or_none(text.get("pixart-tune"))
    if isinstance(parameters, dict):
        save_png(image, target, public_value(parameters))
        return
    info = PngInfo()
    for key, value in text.items():
        decoded = _json_or_none(value)
        if isinstance(decoded, (dict, list)):
            info.add_text(key, json.dumps(public_value(decoded)))
        else:
            info.add_text(key, _PATH_IN_TEXT.sub(lambda match: local_name(match.group(0)), value))
    image.save(target, pnginfo=info)


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
    """Writes a folder ready for the Hub: PEFT adapter, one file per ComfyUI LoRA node, images, README.md.

    Nothing in it names a local path: the header's paths become names, the PEFT
    config's ``base_model_name_or_path`` is the card's base model (a Hub id), and the
    samples' PNG text is rewritten without them.
    """
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
    elif is_local_path(base_model, reference=True):
        raise UserError(f"--base-model {base_model} is a local path; name the base model by its Hub id (owner/name)")
    weights = dataclasses.replace(weights, metadata=public_metadata(weights.metadata))
    words = list(trigger_words) or [str(w) for w in (values.get("trigger_words") or []) if str(w)]
    images = _expand(samples) if samples is not None else find_samples(path)
    out = Path(out)
    # An existing folder (a clone of the Hub repository, an earlier publish) keeps every file this does not write.
    with files_into(out) as tmp:
        files = {}
        if not weights.lycoris:
            write_weights(weights, tmp / "peft")
            for item in (tmp / "peft").iterdir():
                item.rename(tmp / item.name)
            (tmp / "peft").rmdir()
            config = json.loads((tmp / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_model
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
            files[ADAPTER_WEIGHTS] = PEFT_FILE_NOTE
        for fmt in LYCORIS_FORMATS if weights.lycoris else PUBLISHED_FORMATS:
            file = export_file(weights, fmt, tmp / f"{name}_{fmt}.safetensors")
            files[file.name] = FORMATS[fmt][1]
        shown = []
        if images:
            (tmp / "images").mkdir()
        for index, image in enumerate(images):
            target = tmp / "images" / f"sample_{index}{image.suffix.lower()}"
            copy_public_image(image, target)
            shown.append(cards.Sample(f"images/{target.name}", sample_prompt(image, weights.metadata)))
        info = cards.CardInfo(
            name=name, base_model=base_model, license=license, trigger_words=words, tags=list(tags),
            samples=shown, metadata=weights.metadata, files=files, repo_id=repo_id,
            comfyui_file=f"{name}_comfyui.safetensors", city96_file=None if weights.lycoris else f"{name}_onetrainer.safetensors",
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
        if config.format == "all" and read_lora(config.adapter, config.allow_pickle_runs_code).lycoris:
            formats = list(LYCORIS_FORMATS)  # the formats that hold LoKr / LoHa
        out = Path(config.out)
        if len(formats) == 1 and out.suffix and out.suffix != ".safetensors":
            raise UserError(f"--out {out}: exports are .safetensors files; name it {out.with_suffix('.safetensors').name}")
        _refuse_unsafe(export_targets(config.adapter, formats, out, config.name), config, "file")
        for fmt, target in zip(formats, export_adapter(config.adapter, formats, out, config.allow_pickle_runs_code, config.name)):
            written.append(f"wrote {target}  ({FORMATS[fmt][1]})")
    if config.publish:
        folder = Path(config.publish)
        _refuse_unsafe([folder], config, "folder")
        publish(
            config.adapter, folder, name=config.name, base_model=config.base_model, trigger_words=config.trigger,
            license=config.license, tags=config.tag, samples=config.samples, repo_id=config.push_to_hub,
            allow_pickle=config.allow_pickle_runs_code,
        )
        written.append(f"wrote the publish folder {folder} (README.md, PEFT adapter, {', '.join(PUBLISHED_FORMATS)} files, images)")
        if config.push_to_hub:
            written.append(f"uploaded to {push_to_hub(folder, config.push_to_hub, config.private)}")
    return written


def _refuse_unsafe(targets: Sequence[Path], config: ExportConfig, kind: str) -> None:
    """The output policy (:func:`pixart_tune.fsutil.refuse_unsafe_outputs`); a publish folder that exists
    receives its files beside what it holds (:func:`pixart_tune.fsutil.files_into`)."""
    inputs = [(config.adapter, "the input adapter"), *((sample, "a sample image") for sample in config.samples or [])]
    flag = "--out" if kind == "file" else "--publish"
    refuse_unsafe_outputs(targets, inputs, overwrite=config.overwrite, kind=kind, flag=flag)
