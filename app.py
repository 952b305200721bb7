"""Launcher for the pixart-tune preview and merge app, as Hugging Face Spaces expect.

Configured by environment variables (see ``pixart_tune.app.settings_from_env``):
``PIXART_TUNE_MODEL`` (folders or hub ids, comma-separated), ``PIXART_TUNE_RUNS``
(adapters; default ``runs``), ``PIXART_TUNE_OUTPUTS`` (merges; default
``RUNS/merged``). Offline demo with the tiny model::

    pixart-tune init-tiny demo/tiny
    PIXART_TUNE_MODEL=demo/tiny PIXART_TUNE_RUNS=demo/runs python app.py
"""

from pixart_tune.app import launch, settings_from_env

if __name__ == "__main__":
    launch(settings_from_env())
