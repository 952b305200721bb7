"""What the app's tabs share: the page's cross-tab widgets, error display and slider rows."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable

from pixart_tune.app.service import SCALES, PreviewApp
from pixart_tune.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Page:
    """Widgets one tab's listeners read or update in another: set as the tabs are built."""

    app: PreviewApp
    buckets: list[tuple[int, int]]
    adapter_choices: list[tuple[str, str]]
    tabs: Any = None
    """The gr.Tabs container; ``gr.Tabs(selected=ID)`` switches to a tab (ids: generate, merge, ...)."""
    model: Any = None
    """The base model menu (above the tabs)."""
    extra: Any = None
    """gr.State: adapters this browser tab added by path."""
    written: Any = None
    """gr.State: the last merge output, for the menus to pick it up."""
    adapters: Any = None
    """The Generate tab's adapters menu."""
    bucket: Any = None
    swept: Any = None
    merge_adapters: Any = None
    """The Merge tab's adapters menu."""
    adapters_note: Any = None
    """gr.Markdown above the tabs: where adapters go, shown while none is found."""
    rescan: Any = None
    """The page's "Rescan folders" button: a tab with its own lists adds a listener to it."""
    after_build: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    """Listeners that need widgets of tabs built later; ``build_app`` calls them once every tab exists."""

    @staticmethod
    def track():
        import gradio as gr

        return gr.Progress(track_tqdm=True)


def shown(action: str, refused: Callable[[], Any]) -> Callable:
    """Turns errors into messages on the page, never tracebacks.

    A UserError (bad input) becomes a warning and the outputs ``refused()`` gives,
    usually "leave as they were": an error would mark every output failed. Other
    exceptions are real failures: an error message, with the traceback in the
    app's console.
    """
    import gradio as gr

    def decorate(fn: Callable) -> Callable:
        def refuse(error: UserError):
            log.info("%s refused: %s", action, error)
            gr.Warning(str(error), title=f"{action}: refused")
            return refused()

        def fail(error: Exception):
            log.exception("%s failed", action)
            return gr.Error(f"{type(error).__name__}: {error} (details in the app's console)", title=f"{action}: failed", print_exception=False)

        if inspect.isgeneratorfunction(fn):  # shows each result as it comes (Gradio streams a generator's yields)
            @functools.wraps(fn)
            def streamed(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except gr.Error as error:
                    error.print_exception = False
                    raise
                except UserError as error:
                    yield refuse(error)
                except Exception as error:
                    raise fail(error) from None

            return streamed

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error as error:  # a message for the page, not a failure: no traceback on the console
                error.print_exception = False
                raise
            except UserError as error:
                return refuse(error)
            except Exception as error:
                raise fail(error) from None

        return wrapper

    return decorate


def sliders_for(app: PreviewApp, selected: list[str], kind: str) -> list:
    """One slider per selected adapter, keyed by path so a value survives re-renders."""
    import gradio as gr

    low, high = SCALES
    return [
        gr.Slider(low, high, value=1.0, step=0.05, label=f"{kind}: {app.label(p)}", key=f"{kind.lower()}-{p}", interactive=True)
        for p in selected
    ]


def follow_sliders(sliders: list, paths: list[str], values) -> None:
    """Each slider writes its value into ``values`` (a hidden gr.JSON of path -> value) that the named events read.

    The events stay outside ``@gr.render``: declared inside, they exist only once a
    browser rendered the sliders, and the API would not list them.
    """
    for slider, path in zip(sliders, paths):
        slider.change(lambda value, current, path=path: {**(current or {}), path: value}, [slider, values], values,
                      api_visibility="private", queue=False, show_progress="hidden")


def values_for(paths, values) -> list[float]:
    """The value of each selected path (1.0 where its slider was not moved)."""
    values = values or {}
    return [values.get(p, 1.0) for p in paths or []]
