"""The preview and merge app (``pixart-tune app``): a Gradio UI over sampling and adapters.

People who trained adapters use it to compare them with the base model (same
seed, side by side), sweep an adapter's scale, merge adapters or fuse them into
the base model, and preview the result at once. It never trains.

Safe by default: it binds to 127.0.0.1 without a share link, and it reads and
writes files only under the folders it was started with (the runs folder, the
outputs folder, local model folders and ``--allow`` folders); merges and fused
models are written into the outputs folder only.

- :mod:`pixart_tune.app.files`: the path guard and adapter discovery;
- :mod:`pixart_tune.app.service`: settings, the loaded model, compare / sweep / merge;
- :mod:`pixart_tune.app.ui`: the Gradio page.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from pixart_tune.app.files import PathGuard, discover_adapters, discover_models, output_path
from pixart_tune.app.service import DEFAULT_HOST, DEFAULT_PORT, AppSettings, PreviewApp
from pixart_tune.app.ui import build_app, launch_kwargs

__all__ = ["AppSettings", "PathGuard", "PreviewApp", "build_app", "discover_adapters", "discover_models",
           "launch", "launch_kwargs", "output_path", "settings_from_env"]

log = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(settings: AppSettings, say: Callable[[str], None]) -> None:
    """Builds the page (loading the first model) and serves it until Ctrl+C; ``say`` tells the person at the console."""
    if settings.host not in _LOOPBACK:
        log.warning("binding to %s: other computers on the network can use this app and read its folders' adapters", settings.host)
    if settings.share:
        log.warning("a public share link was asked for: anyone with the link can use this app")
    say(f"loading {settings.models[0]} ...")
    demo = build_app(settings)
    try:
        # Gradio's own launch lines are off (launch_kwargs: quiet): this one says where and how to stop.
        _, local_url, share_url = demo.launch(**launch_kwargs(settings), prevent_thread_lock=True)
        public = f" and at {share_url}" if share_url else ""
        say(f"serving at {local_url}{public}; open it in a browser, press Ctrl+C here to stop")
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # the way to stop the app, not a failure
        say("stopped")
    finally:
        demo.close(verbose=False)


def settings_from_env(environ: dict[str, str] | None = None) -> AppSettings:
    """Settings for the root ``app.py`` launcher (the Hugging Face Spaces entry point).

    ``PIXART_TUNE_MODEL`` (comma-separated folders or hub ids), ``PIXART_TUNE_RUNS``
    (default ``runs``, created if missing), ``PIXART_TUNE_OUTPUTS``,
    ``PIXART_TUNE_ALLOW`` (``os.pathsep``-separated), ``PIXART_TUNE_DEVICE``,
    ``PIXART_TUNE_DTYPE``; the host and port come from Gradio's own
    ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, which Spaces set.
    """
    from pixart_tune.base import REAL_MODEL_ID

    env = os.environ if environ is None else environ
    runs = Path(env.get("PIXART_TUNE_RUNS", "runs"))
    runs.mkdir(parents=True, exist_ok=True)
    return AppSettings(
        models=env.get("PIXART_TUNE_MODEL", REAL_MODEL_ID).split(","),
        runs=runs,
        outputs=env.get("PIXART_TUNE_OUTPUTS") or None,
        allow=[p for p in env.get("PIXART_TUNE_ALLOW", "").split(os.pathsep) if p],
        host=env.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
        port=int(env.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
        device=env.get("PIXART_TUNE_DEVICE") or None,
        dtype=env.get("PIXART_TUNE_DTYPE", "auto"),
    )
