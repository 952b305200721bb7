"""The ``pixart-tune`` command: dispatches to the verb modules of :mod:`pixart_tune.commands`.

Each verb imports its library only when it runs, so ``pixart-tune --help`` answers
at once and one verb's heavy imports never slow another.
"""

from __future__ import annotations

import logging
import sys

from pixart_tune import __version__
from pixart_tune.commands import VERBS
from pixart_tune.errors import UserError


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [f"pixart-tune {__version__}: fine-tuning and LoRA toolkit for PixArt-Sigma", "", "usage: pixart-tune VERB [options]", ""]
    lines += [f"  {verb:<{width}}  {module.SUMMARY}" for verb, module in VERBS.items()]
    lines += ["", "Run 'pixart-tune VERB --help' for the options of one verb."]
    return "\n".join(lines)


def configure_logging() -> None:
    """The toolkit's own INFO lines; from libraries, warnings and errors only, each printed once.

    Library INFO lines are noise on a console (httpx logs every request the app
    makes to itself: ``HTTP Request: GET ... "HTTP/1.1 200 OK"``). diffusers and
    transformers print through their own handlers, not through these.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pixart_tune").setLevel(logging.INFO)
    # bitsandbytes' CPU backend warns at import that an optional package for its
    # 4-bit CPU kernel is missing; nothing here runs 4-bit on a CPU.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # huggingface_hub gives its logger a bare stderr handler of its own and lets
    # records reach the root logger's too: every warning came out twice.
    from huggingface_hub.utils import logging as hub_logging

    hub = hub_logging.get_logger()
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
    hub.propagate = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"pixart-tune: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        return int(VERBS[verb].main(rest) or 0)
    except KeyboardInterrupt:
        print("pixart-tune: interrupted", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"pixart-tune {verb}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
