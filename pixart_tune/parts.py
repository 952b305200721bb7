"""Where a model's parts are: its transformer, and the VAE, T5, tokenizer and scheduler around it.

PixArt checkpoints are published three ways (read from the Hub repositories and
diffusers' own tests and docs):

* a full diffusers pipeline (``model_index.json``, ``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``): PixArt-Sigma-XL-2-1024-MS,
  PixArt-XL-2-1024-MS, most fine-tunes;
* ``transformer/`` alone: PixArt-Sigma-XL-2-512-MS and -2K-MS, whose own examples
  take the rest from ``PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers``;
* a bare transformer (``config.json`` and weights at the top), as community
  fine-tunes are often shared.

:func:`resolve_parts` says, for a model folder or hub id, where its transformer is
and where the other components come from: the ``components`` the person named
(``--components`` / the recipe's ``components:``, registered with
:func:`use_components`), else the model itself when it holds them, else its
family's component repository, with one log line saying so and how to change it.
Every loader in :mod:`pixart_tune.models` and :mod:`pixart_tune.hub` goes through it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pixart_tune.errors import UserError
from pixart_tune.family import Family, detect_family, read_json

logger = logging.getLogger(__name__)

COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
TRANSFORMER = "transformer"

# Official repositories that hold transformer/ alone (Hub trees; diffusers' tests load
# them with subfolder="transformer" and take everything else from another repository).
TRANSFORMER_ONLY = frozenset({
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
    "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS",
    "PixArt-alpha/PixArt-Sigma-XL-2-256x256",
    "PixArt-alpha/PixArt-XL-2-256x256",
})

_CHOSEN: dict[str, str] = {}
"""model -> the components the person named for it (set by the verbs)."""
_TOLD: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class ModelParts:
    model: str
    transformer_subfolder: str | None
    """``transformer`` for the diffusers layout; None for a bare transformer (config at the top)."""
    components: str
    """Folder or hub id holding vae/, text_encoder/, tokenizer/ and scheduler/."""
    components_from: str
    """Why those components: "the model", "components=..." or the family's default."""
    family: Family

    @property
    def own_components(self) -> bool:
        return self.components == self.model


def use_components(model: str, components: str | None) -> None:
    """Records that ``model``'s VAE, T5, tokenizer and scheduler come from ``components``; None changes nothing."""
    if components:
        _CHOSEN[str(model)] = str(components)


def forget_components(model: str) -> None:
    """Drops what :func:`use_components` recorded for ``model``: found as usual again."""
    _CHOSEN.pop(str(model), None)


def component_source(model: str, part: str) -> str:
    """Where ``model``'s ``part`` (vae, text_encoder, tokenizer, scheduler) loads from: the model
    folder when it holds that part (a folder holding T5 alone encodes text), else its components."""
    if (Path(model) / part).is_dir():
        return str(model)
    return resolve_parts(model).components


def components_of(model: str) -> str | None:
    """The components registered for ``model``, if any."""
    return _CHOSEN.get(model)


def resolve_parts(model: str, components: str | None = None) -> ModelParts:
    """Where ``model``'s transformer and components are (nothing is downloaded here)."""
    model = str(model)
    components = components or _CHOSEN.get(model)
    local = Path(model).expanduser()
    if local.is_dir():
        subfolder = _local_transformer(local)
        index, vae, transformer = _local_configs(local, subfolder)
        has_own = all((local / name).is_dir() for name in COMPONENTS)
    else:
        subfolder, index, vae, transformer = _hub_configs(model)
        has_own = model not in TRANSFORMER_ONLY and subfolder == TRANSFORMER
    if components is not None:
        vae = vae or _component_vae(components)
        family = detect_family(index, vae, transformer, model)
        return ModelParts(model, subfolder, components, f"components={components}", family)
    family = detect_family(index, vae, transformer, model)
    if has_own:
        return ModelParts(model, subfolder, model, "the model", family)
    parts = ModelParts(model, subfolder, family.components, f"the PixArt-{family.name} default", family)
    if (model, parts.components) not in _TOLD:
        _TOLD.add((model, parts.components))
        logger.info(
            "%s holds a transformer alone: its VAE, T5, tokenizer and scheduler come from %s (set components=FOLDER_OR_ID, "
            "or --components, to use others)", model, parts.components,
        )
    return parts


def _local_transformer(folder: Path) -> str | None:
    if (folder / TRANSFORMER / "config.json").is_file():
        return TRANSFORMER
    config = read_json(folder / "config.json")
    if config and "Transformer2DModel" in str(config.get("_class_name", "")):
        return None
    return TRANSFORMER  # a components-only folder, or not a model: the transformer's loader says so


def _local_configs(folder: Path, subfolder: str | None) -> tuple[dict | None, dict | None, dict | None]:
    transformer = folder / subfolder / "config.json" if subfolder else folder / "config.json"
    return read_json(folder / "model_index.json"), read_json(folder / "vae" / "config.json"), read_json(transformer)


def _hub_configs(model: str) -> tuple[str | None, dict | None, dict | None, dict | None]:
    """What the local Hugging Face cache knows of hub model ``model`` (never the network)."""
    def cached(name: str) -> dict | None:
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model, name)
        except Exception:  # not a hub id, or no cache: nothing known
            return None
        return read_json(Path(path)) if isinstance(path, str) else None

    bare = cached("config.json")
    subfolder = None if bare and "Transformer2DModel" in str(bare.get("_class_name", "")) else TRANSFORMER
    transformer = bare if subfolder is None else cached(f"{TRANSFORMER}/config.json")
    return subfolder, cached("model_index.json"), cached("vae/config.json"), transformer


def _component_vae(components: str) -> dict | None:
    folder = Path(components).expanduser()
    if folder.is_dir():
        return read_json(folder / "vae" / "config.json")
    return _hub_configs(components)[2]


def check_components(components: str) -> None:
    """Refuses a local components folder that lacks one of the parts."""
    folder = Path(components).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"components {components} is a file; give a folder holding {', '.join(COMPONENTS)} (or a hub id)")
    if folder.is_dir():
        missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise UserError(
                f"components {components} has no {', '.join(name + '/' for name in missing)}; give a folder (or hub id) holding "
                f"{', '.join(COMPONENTS)}, such as a full PixArt pipeline"
            )
