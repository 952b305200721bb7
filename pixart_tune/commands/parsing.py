"""One argument parser for every verb: no abbreviations, every option's default in its help."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says its default already.

    Options whose default is "not given" (None, False, an empty list or string) have
    nothing to show; their help says what happens without them.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        # argparse %-formats help texts: a % in the default must stay a %.
        return with_default(text, action.default, escape=True)


def with_default(text: str, default: Any, escape: bool = False) -> str:
    """``text (default: X)``, lists written as ``a, b``; a help text that tells its default already is kept."""
    if default is None or default is False or default in ([], "", ()) or "default" in text:
        return text
    shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return f"{text} (default: {shown.replace('%', '%%') if escape else shown})"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """As :class:`HelpFormatter`, with the description and epilog printed as written."""


def verb_parser(prog: str, description: str, epilog: str | None = None, raw: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of one verb. ``allow_abbrev=False``: ``--resum`` must not quietly mean ``--resume``."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=RawHelpFormatter if raw else HelpFormatter,
        allow_abbrev=False,
        **kwargs,
    )
