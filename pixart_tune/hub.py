"""Models by hub id or folder: one look-up, and one clear line when a model cannot be had.

Every verb takes a local folder in the diffusers layout or a Hugging Face Hub id.
Without a network, the hub client retries each uncached file for minutes before
failing in many lines; these helpers ask once and say in one line what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pixart_tune.errors import UserError

logger = logging.getLogger(__name__)


def looks_like_path(name: str) -> bool:
    """Written as a path (``/``, ``.``, ``~`` first, or more than one ``/``), so never a hub id (``owner/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_component(model: str, subfolder: str) -> Path:
    """The local folder of ``subfolder`` of a model folder or hub id (downloading when online).

    The VAE, T5, tokenizer and scheduler come from where :func:`~pixart_tune.parts.resolve_parts`
    says (the model, ``--components``, or its family's component repository); a bare
    transformer's "transformer" folder is the model folder itself.
    """
    from pixart_tune.parts import COMPONENTS, TRANSFORMER, component_source, resolve_parts

    if subfolder in COMPONENTS:
        model = component_source(model, subfolder)
    elif subfolder == TRANSFORMER and resolve_parts(model).transformer_subfolder is None and Path(model).is_dir():
        return Path(model)
    local = Path(model) / subfolder
    if local.is_dir():
        return local
    if Path(model).is_dir():
        raise UserError(
            f"{model} has no {subfolder}/ folder; point --model at a PixArt pipeline folder in the diffusers layout "
            f"(or a transformer folder, with --components naming where the VAE, T5, tokenizer and scheduler are)"
        )
    if looks_like_path(model):
        raise UserError(f"model folder {model} does not exist; give a pipeline folder (pixart-tune init-tiny makes a tiny one) or a hub id")
    if (model, subfolder) not in _HUB_FOLDERS:
        from huggingface_hub import snapshot_download

        # One look-up, no retries: without a network it falls back to the local cache at once.
        try:
            _HUB_FOLDERS[model, subfolder] = Path(snapshot_download(model, allow_patterns=[f"{subfolder}/*"])) / subfolder
        except Exception as error:  # hub errors come in many classes; hub_trouble sorts them into one line
            raise hub_trouble(model, "model", "--model", error) from None
    return _HUB_FOLDERS[model, subfolder]


# (hub id, subfolder) -> its folder in the local cache: each is looked up once a run
_HUB_FOLDERS: dict[tuple[str, str], Path] = {}


def local_model(model: str, subfolder: str) -> str:
    """The local folder of a model folder or hub id that holds ``subfolder``, for ``from_pretrained(..., subfolder=...)``.

    Loading a hub model from its folder in the cache asks the network nothing:
    ``from_pretrained`` given the id asks about every file again, and without a
    network retries each one it has not cached (optional files included) for minutes.
    """
    return str(resolve_component(model, subfolder).parent)


def hub_trouble(model: str, what: str, flag: str, error: BaseException | None) -> UserError:
    """One line that says why hub model ``model`` cannot be had, and what to do instead.

    ``error`` is what the hub client raised (None: offline mode, nothing cached).
    The client's own messages run to several lines and name environment variables
    and URLs of its documentation; the person needs the model's name and a way on.
    """
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cause = None if error is None else (error.__cause__ or error)
    local = f"or pass a local folder to {flag}"
    if isinstance(cause, GatedRepoError):
        return UserError(f"{what} {model!r} is gated on the Hugging Face Hub: accept its terms at {constants.ENDPOINT}/{model} and log in (hf auth login), {local}")
    if isinstance(cause, RepositoryNotFoundError):
        return UserError(f"no {what} {model!r} on the Hugging Face Hub: check the id (a private one needs hf auth login), {local}")
    if error is None or is_offline_mode():
        return UserError(f"{what} {model!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): unset it to download the {what}, {local}")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        reason = f"HTTP {cause.response.status_code}"
    else:
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:120]
    return UserError(
        f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}: {reason}) to download {what} {model!r}, and it is not in the local cache: "
        f"connect and run again, or download it where there is a network (hf download {model}) and pass its folder to {flag}"
    )


def hub_source(model: str, what: str, flag: str) -> str:
    """What ``from_pretrained`` should load for hub id ``model``: the id when the hub answers, else its folder in the local cache.

    One request, no retries, before ``from_pretrained`` makes its own: without a
    network, the hub client tries each file it has not cached six times with
    growing pauses (minutes of retry lines before transformers' error), optional
    files such as ``adapter_config.json`` included, so a cached copy is loaded
    from its folder, which asks the network nothing.
    Raises a one-line :func:`hub_trouble` error when the model can be neither
    reached nor found in the cache.
    """
    from huggingface_hub import HfApi, constants, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        config = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid hub id (HFValidationError)
        raise UserError(f"{what} {model!r} is neither a folder nor a Hugging Face Hub id (owner/name); {flag} takes either") from None
    cached = str(Path(config).parent) if isinstance(config, str) else None
    if is_offline_mode():
        if cached:
            return cached
        raise hub_trouble(model, what, flag, None)
    try:
        HfApi().model_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # connection, timeout, proxy, TLS, HTTP status: many classes, one line
        if cached and not isinstance(error, RepositoryNotFoundError):
            logger.warning("cannot reach the Hugging Face Hub (%s); loading %s %s from the local cache", type(error).__name__, what, model)
            return cached
        raise hub_trouble(model, what, flag, error) from None
    return model
