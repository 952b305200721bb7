"""The model card (``README.md``) of a published adapter, with Hugging Face YAML front matter.

Everything the card states comes from the adapter itself: the training settings
and trigger words recorded in its safetensors header by the trainer, its rank and
alpha, and the sample images placed beside it. The front matter fields are the
ones the Hub reads for LoRA repositories: ``base_model``, ``tags``,
``instance_prompt`` (trigger words), ``license`` and ``widget`` (images with the
prompt that made them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from pixart_tune.base import REAL_MODEL_ID

DEFAULT_TAGS = ("text-to-image", "lora", "pixart-sigma", "diffusers", "template:sd-lora", "pixart-tune")


@dataclasses.dataclass
class Sample:
    """One image of the card's widget."""

    file: str
    """Path relative to the card, e.g. ``images/sample_0.png``."""
    prompt: str


@dataclasses.dataclass
class CardInfo:
    name: str
    """Title of the card."""
    base_model: str = REAL_MODEL_ID
    license: str = "openrail++"
    """The license of the adapter weights; PixArt-Sigma itself is released under openrail++."""
    trigger_words: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    samples: list[Sample] = dataclasses.field(default_factory=list)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    """The adapter's safetensors header."""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    """File name -> which loader it is for."""
    repo_id: str | None = None
    comfyui_file: str | None = None
    """The file for ComfyUI's core LoRA loader (the ``comfyui`` export), if the folder has one."""
    city96_file: str | None = None
    """The file for city96's "PixArt Load LoRA" node (the ``onetrainer`` export), if the folder has one."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("the card needs a name")


def decoded(metadata: dict[str, str]) -> dict[str, Any]:
    """Header values with the JSON ones decoded (the trainer stores non-strings as JSON)."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def training_settings(metadata: dict[str, str]) -> dict[str, Any]:
    """The settings worth a reader's attention, flattened to dotted keys."""
    values = decoded(metadata)
    settings: dict[str, Any] = {}
    for key in (
        "lora_rank", "lora_alpha", "lora_targets", "steps", "resolution", "merge_method", "energy_kept", "prior_preservation",
        "masked_images", "ema", "dataset_fingerprint", "pixart_tune_version",
    ):
        if key in values and values[key] not in ("", None):
            settings[key] = values[key]
    config = values.get("training_config")
    if isinstance(config, dict):
        for section in ("lora", "optim", "schedule", "diffusion", "data", "ema"):
            part = config.get(section)
            if isinstance(part, dict) and (section != "ema" or part.get("enabled")):
                _flatten(settings, section, part)
        diffusion = config.get("diffusion")
        if isinstance(diffusion, dict) and diffusion.get("weighting") is None:
            # null means "min_snr when a gamma is set": the card says which was in force.
            settings["diffusion.weighting"] = "min_snr" if diffusion.get("min_snr_gamma") is not None else "none"
        for key in ("dtype", "seed", "gradient_checkpointing"):
            if isinstance(config.get(key), (str, int, float, bool)):
                settings[key] = config[key]
    return settings


def _flatten(settings: dict[str, Any], prefix: str, part: dict[str, Any]) -> None:
    """Settings of one recipe section (and its subsections, such as diffusion.timesteps) as dotted keys:
    scalars, and lists of scalars (optim.betas, diffusion.timesteps.range); not paths or lists of sections."""
    for key, value in part.items():
        if key in ("path", "eval", "num_workers"):
            continue
        if isinstance(value, dict):
            _flatten(settings, f"{prefix}.{key}", value)
        elif _is_setting(value) or (isinstance(value, list) and value and all(map(_is_setting, value))):
            settings[f"{prefix}.{key}"] = value


def _is_setting(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and value != ""


_METRICS = (
    ("eval/loss", "held-out loss at the end (fixed timesteps and noise; lower is better)", "{:.4f}"),
    ("eval/loss_lowest", "lowest held-out loss", "{:.4f}"),
    ("eval/loss_lowest_step", "at step", "{:.0f}"),
    ("validation/clip_score", "CLIP score of the validation images (0-100, higher follows the prompts better)", "{:.2f}"),
    ("validation/clip_score_base", "CLIP score of the base model on the same prompts and seeds", "{:.2f}"),
)


def evaluation_section(metadata: dict[str, str]) -> list[str]:
    """The run's final evaluation figures (recorded by the trainer), as a table; none without them."""
    metrics = decoded(metadata).get("metrics")
    if not isinstance(metrics, dict):
        return []
    rows = [f"| {label} | {form.format(metrics[key])} |" for key, label, form in _METRICS if isinstance(metrics.get(key), (int, float))]
    return ["## Evaluation", "", "| measure | value |", "|---|---|", *rows, ""] if rows else []


def front_matter(info: CardInfo) -> dict[str, Any]:
    data: dict[str, Any] = {
        "base_model": info.base_model,
        "library_name": "diffusers",
        "license": info.license,
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys([*DEFAULT_TAGS, *info.tags])),
    }
    if info.trigger_words:
        data["instance_prompt"] = ", ".join(info.trigger_words)
    if info.samples:
        data["widget"] = [{"text": s.prompt, "output": {"url": s.file}} for s in info.samples]
    return data


def render(info: CardInfo) -> str:
    """The full README.md text."""
    matter = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True).strip()
    lines = ["---", matter, "---", "", f"# {info.name}", ""]
    lines += [f"A LoRA for [{info.base_model}](https://huggingface.co/{info.base_model}), trained with pixart-tune.", ""]
    if info.trigger_words:
        lines += ["## Trigger words", "", "Use " + ", ".join(f"`{w}`" for w in info.trigger_words) + " in the prompt.", ""]
    if info.samples:
        lines += ["## Samples", ""]
        lines += [f"![{s.prompt}]({s.file})  \n*{s.prompt}*" for s in info.samples]
        lines += [""]
    lines += ["## Files", "", "| file | for |", "|---|---|"]
    lines += [f"| `{name}` | {purpose} |" for name, purpose in info.files.items()]
    lines += ["", "## Use with diffusers", "", "```python"]
    lines += [
        "import torch",
        "from diffusers import PixArtSigmaPipeline",
        "from pixart_tune.adapters.loader import AdapterSpec, load_adapters",
        "",
        f'pipe = PixArtSigmaPipeline.from_pretrained("{info.base_model}", torch_dtype=torch.bfloat16).to("cuda")',
        *(
            ["from huggingface_hub import snapshot_download", f'adapter = snapshot_download("{info.repo_id}")']
            if info.repo_id else ['adapter = "path/to/this/folder"']
        ),
        "load_adapters(pipe.transformer, [AdapterSpec(adapter, scale=1.0)])",
        'image = pipe("' + (info.samples[0].prompt if info.samples else "a photo") + '").images[0]',
        "```",
        "",
        "diffusers has no LoRA loader for PixArt-Sigma; `pixart-tune sample` and the code above apply it,"
        " as does PEFT on the transformer (`adapter_config.json` + `adapter_model.safetensors`).",
        "",
    ]
    lines += comfyui_section(info)
    lines += evaluation_section(info.metadata)
    settings = training_settings(info.metadata)
    if settings:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in settings.items()]
        lines += [""]
    return "\n".join(lines)


def comfyui_section(info: CardInfo) -> list[str]:
    """How to load the adapter in ComfyUI, as far as its LoRA nodes can (read from their source)."""
    if not info.comfyui_file and not info.city96_file:
        return []
    lines = ["## Use in ComfyUI", ""]
    if info.comfyui_file:
        lines += [
            f"Load `{info.comfyui_file}` with ComfyUI's own **LoraLoaderModelOnly** node, on a"
            " PixArt-Sigma model loaded by ComfyUI's loaders or by the **PixArt Checkpoint Loader** of city96's"
            " ComfyUI_ExtraModels: every layer is applied exactly.",
            "",
        ]
    if info.city96_file:
        prefer = " Prefer the core node above." if info.comfyui_file else ""
        lines += [
            f"The **PixArt Load LoRA** node of ComfyUI_ExtraModels loads `{info.city96_file}`, but only part of it"
            " takes effect: on ComfyUI 0.1.1 and later the self-attention q/k/v and cross-attention k/v layers are not"
            " applied (ComfyUI logs `ERROR lora ... attn.qkv`; before 0.1.1 they came at 1/3 and 1/2 strength);"
            f" the other layers are exact.{prefer}",
            "",
        ]
    return lines


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (for tests and for reading cards back)."""
    if not text.startswith("---\n"):
        raise ValueError("no front matter")
    end = text.index("\n---", 4)
    return yaml.safe_load(text[4:end])


def write_card(info: CardInfo, folder: str | Path) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render(info), encoding="utf-8")
    return path
