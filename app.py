"""Launcher for the pixart-tune preview and merge app, as Hugging Face Spaces expect.

Configured by environment variables (see ``pixart_tune.app.settings_from_env``):
``PIXART_TUNE_MODEL`` (folders or hub ids, comma-separated), ``PIXART_TUNE_RUNS``
(adapters; default ``runs``), ``PIXART_TUNE_OUTPUTS`` (merges; default
``RUNS/merged``). Offline demo with the tiny model::

    pixart-tune init-tiny demo/tiny
    PIXART_TUNE_MODEL=demo/tiny PIXART_TUNE_RUNS=demo/runs python app.py
"""

import sys

from pixart_tune.app import launch, settings_from_env
from pixart_tune.cli import configure_logging
from pixart_tune.errors import UserError

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip() + "\n\nWith flags instead of variables: pixart-tune app --help")
        raise SystemExit(0)
    configure_logging()
    try:
        launch(settings_from_env(), say=lambda line: print(line, flush=True))
    except UserError as error:
        raise SystemExit(f"app.py: error: {error}") from None
