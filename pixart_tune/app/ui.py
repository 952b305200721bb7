"""The Gradio page: the base model menu above the tabs, one module per tab.

The widgets only collect values and show results; :class:`PreviewApp` does the
work and checks every value again. Per-adapter sliders are drawn with
``@gr.render`` from the selected adapters, so the listeners that read them are
declared inside the render functions, as Gradio requires. Widgets one tab updates
in another are collected on a :class:`~pixart_tune.app.page.Page`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from pixart_tune.app import generate_tab, grid_tab, merge_tab, runs_tab
from pixart_tune.app.page import Page
from pixart_tune.app.service import (
    AppSettings,
    PreviewApp,
    bucket_choices,
    square_bucket,
)
from pixart_tune.errors import UserError

log = logging.getLogger(__name__)

TITLE = "pixart-tune: preview and merge adapters"
MAX_UPLOAD = "5mb"
"""The page uploads nothing; a bigger upload to Gradio's upload route is refused."""
CSS = """
/* On a phone the columns stack: the results come first, above the controls. */
@media (max-width: 720px) {
  .results-first { flex-direction: column-reverse !important; }
}
"""


def build_app(settings: AppSettings, app: PreviewApp | None = None):
    """The Gradio Blocks page. The first model is loaded here, so its sizes can be offered."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio writes every image it shows into its cache: keep that inside the outputs
    # folder too (hidden, so adapter discovery skips it) rather than in /tmp.
    settings.outputs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.outputs / ".gradio-cache"))
    import gradio as gr

    app = app or PreviewApp(settings)
    page = Page(app, app.holder.get(app.check_model(settings.models[0])).buckets(), app.adapter_choices())

    # delete_cache: every hour, drop cached previews older than a day.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        page.extra = gr.State([])
        page.written = gr.State("")
        gr.Markdown(
            f"## {TITLE}\nAdapters are read from `{settings.runs}`; merges and fused models are written to "
            f"`{settings.outputs}`. The app touches no file outside its folders."
        )
        with gr.Row():
            page.model = gr.Dropdown(app.model_choices(), value=settings.models[0], label="Base model", allow_custom_value=True, scale=5,
                                     elem_id="model", info="A startup model, a fused model from the outputs folder, or a pipeline folder under the allowed folders")
            rescan = page.rescan = gr.Button("Rescan folders", scale=0, min_width=160, size="md", elem_id="rescan")
        note = app.adapters_note(page.adapter_choices)
        page.adapters_note = gr.Markdown(note, visible=bool(note), elem_id="adapters-note")

        with gr.Tabs() as page.tabs:
            generate_tab.build(page, app)
            merge_tab.build(page, app)
            runs_tab.build(page, app)
            grid_tab.build(page, app)
        for connect in page.after_build:
            connect()

        def rescan_folders(selected, merging, current_extra):
            choices = app.adapter_choices(current_extra)
            values = {value for _, value in choices}
            note = app.adapters_note(choices)
            return (
                gr.Dropdown(choices=choices, value=[p for p in selected or [] if p in values]),
                gr.Dropdown(choices=choices, value=[p for p in merging or [] if p in values]),
                gr.Dropdown(choices=app.model_choices()),
                gr.Markdown(note, visible=bool(note)),
            )

        def offer_found(current_extra):
            # On page load only the choices change: a value set here would undo an adapter
            # the person picked while the scan ran (the event read the menus before that).
            choices = app.adapter_choices(current_extra)
            note = app.adapters_note(choices)
            return gr.Dropdown(choices=choices), gr.Dropdown(choices=choices), gr.Dropdown(choices=app.model_choices()), gr.Markdown(note, visible=bool(note))

        outputs = [page.adapters, page.merge_adapters, page.model, page.adapters_note]
        rescan.click(rescan_folders, [page.adapters, page.merge_adapters, page.extra], outputs, api_visibility="private", show_progress="hidden")
        # Each page load scans too, so adapters trained since the start are offered.
        demo.load(offer_found, [page.extra], outputs, api_visibility="private", show_progress="hidden")

        def change_model(name, progress=page.track()):
            # A model that cannot load is a warning and the menu goes back to the loaded
            # model: an error would mark the size menu failed and block it.
            try:
                progress(0.0, desc=f"loading {name}")
                with app.holder.lock:
                    sizes = app.holder.get(app.check_model(name)).buckets()
            except Exception as error:
                if not isinstance(error, UserError):
                    log.exception("loading %s failed", name)
                gr.Warning(str(error), title="Base model: not loaded")
                return gr.skip(), gr.Dropdown(value=app.holder.loaded or settings.models[0])
            return gr.Dropdown(choices=bucket_choices(sizes), value=square_bucket(sizes)), gr.skip()

        page.model.change(change_model, page.model, [page.bucket, page.model], api_visibility="private")

    demo.queue(default_concurrency_limit=1)
    _quiet_rejections(demo)
    return demo


def _quiet_rejections(demo) -> None:
    """Values Gradio itself rejects (a number under its minimum, a menu value no longer offered) without tracebacks.

    Gradio raises a ``gr.Error`` for them, shown on the page like ours, and prints
    a traceback for every ``gr.Error`` whose ``print_exception`` is left on, which
    its own are: a console full of tracebacks for typing -1 into a seed. Other
    exceptions keep theirs.
    """
    import gradio as gr

    process_api = demo.process_api

    @functools.wraps(process_api)
    async def quiet(*args, **kwargs):
        try:
            return await process_api(*args, **kwargs)
        except gr.Error as error:
            error.print_exception = False
            raise

    demo.process_api = quiet


def _same_origin_uploads():
    """A middleware that refuses uploads sent by pages of other sites (a browser names the page's origin)."""
    from urllib.parse import urlsplit

    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse

    class SameOriginUploads:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload"):
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                origin = headers.get("origin")
                if origin is not None and urlsplit(origin).netloc != headers.get("host"):
                    log.info("refused an upload from another site (%s)", origin)
                    await PlainTextResponse("uploads are accepted from this app's own page only", status_code=403)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    return Middleware(SameOriginUploads)


def launch_kwargs(settings: AppSettings) -> dict[str, Any]:
    """Arguments for ``Blocks.launch``: Gradio may serve files from the outputs folder only."""
    settings.outputs.mkdir(parents=True, exist_ok=True)
    return dict(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        allowed_paths=[str(settings.outputs)],
        show_error=False,
        css=CSS,
        # The page itself uploads nothing: Gradio's upload route takes small files only, and from this page only.
        max_file_size=MAX_UPLOAD,
        app_kwargs={"middleware": [_same_origin_uploads()]},
        # No "Running on local URL" and no "set `share=True` in `launch()`" hint (the flag is --share): launch() says where it serves.
        quiet=True,
    )
