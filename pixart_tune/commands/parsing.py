"""One way to read a verb's arguments: flags that stand for the fields of its typed config.

Each verb has a config dataclass whose fields carry a docstring. Its flags are
declared against those fields (:class:`ConfigFlags`): the field's docstring is the
flag's help, its default is shown there, and the parsed values are checked by the
same :func:`pixart_tune.config.from_dict` that reads YAML, so a flag, a YAML key and
a ``--set key=value`` override are one thing spelled three ways.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pixart_tune.config import apply_overrides, field_defaults, field_docs, from_dict, load_yaml
from pixart_tune.errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        # argparse %-formats help texts: a % in the default must stay a %.
        return with_default(text, action.default, escape=True)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """As :class:`HelpFormatter`, with the description and epilog printed as written."""


def with_default(text: str, default: Any, escape: bool = False) -> str:
    """``text (default: X)``, lists written as ``a, b``; a help text that tells its default already is kept.

    Options whose default is "not given" (None, False, an empty list or string) have
    nothing to show; their help says what happens without them.
    """
    if default is None or default is False or default in ([], "", ()) or "default" in text:
        return text
    shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return f"{text} (default: {shown.replace('%', '%%') if escape else shown})"


def verb_parser(prog: str, description: str, epilog: str | None = None, raw: bool = False) -> argparse.ArgumentParser:
    """The parser of one verb. ``allow_abbrev=False``: ``--resum`` must not quietly mean ``--resume``."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=RawHelpFormatter if raw else HelpFormatter,
        allow_abbrev=False,
    )


class ConfigFlags:
    """The arguments of a verb that stand for fields of its config dataclass ``cls``.

    Every such verb also takes ``--config FILE`` (YAML with the config's keys) and
    ``--set KEY=VALUE``: the file first, then the flags given, then the ``--set``
    overrides, all checked by :func:`pixart_tune.config.from_dict`.
    """

    def __init__(self, parser: argparse.ArgumentParser, cls: type):
        self.parser, self.cls = parser, cls
        self.names = {field.name for field in dataclasses.fields(cls)}
        self.docs = field_docs(cls)
        self.defaults = field_defaults(cls)
        self.flags: dict[str, str] = {}
        """Field -> the flag (or positional) that stands for it."""
        parser.add_argument("--config", metavar="FILE", help=f"YAML file with {cls.__name__} keys (the flags given override it)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"set any {cls.__name__} key (after the file and the flags)")

    def add(self, *flags: str, field: str | None = None, help: str | None = None, **options: Any) -> None:
        """A flag (or a positional, given a bare name) for ``field``; help: the field's docstring unless given.

        A flag for a field without default is required, by the config rather than by
        argparse, so that the ``--config`` file may give it instead.
        """
        positional = not flags[0].startswith("-")
        name = field or flags[0].lstrip("-").replace("-", "_")
        if name not in self.names:
            raise TypeError(f"{flags[0]} stands for {name!r}, which is no field of {self.cls.__name__}")
        text = help or self.docs.get(name)
        if not text:
            raise TypeError(f"{self.cls.__name__}.{name} has no docstring to serve as the help of {flags[0]}")
        if positional:
            self.parser.add_argument(name, metavar=flags[0], help=text, **options)
        else:
            # None: not given on the command line, so the --config file or the field's default holds.
            self.parser.add_argument(*flags, dest=name, default=None, help=with_default(text, self.defaults.get(name), escape=True), **options)
        self.flags[name] = flags[0]

    def config(self, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
        """The config: ``base`` (defaults of the verb's own), the ``--config`` file, the flags given, the ``--set`` overrides."""
        data = dict(base or {})
        if args.config:
            data.update(load_yaml(args.config))
        for name in self.flags:
            value = getattr(args, name)
            if value is not None:
                data[name] = list(value) if isinstance(value, tuple) else value
        data = apply_overrides(data, list(args.set))
        for name in self.names - set(self.defaults) - set(data):
            flag = self.flags.get(name, f"--set {name}=...")
            raise UserError(f"{flag} is required (or give {name}: in the --config file)")
        return from_dict(self.cls, data)
