"""``pixart-tune init-tiny``: a tiny PixArt-Sigma pipeline for offline tests and demos."""

from __future__ import annotations

from pixart_tune.commands.parsing import ConfigFlags, verb_parser
from pixart_tune.errors import UserError
from pixart_tune.fsutil import os_error_text

SUMMARY = "write a tiny PixArt-Sigma pipeline for offline tests and demos"


def main(argv: list[str]) -> int:
    from pixart_tune.tiny import TinyConfig, init_tiny

    parser = verb_parser(
        prog="pixart-tune init-tiny",
        description="Write a tiny PixArt-Sigma pipeline (diffusers layout) for offline tests and demos.",
    )
    flags = ConfigFlags(parser, TinyConfig)
    flags.add("OUT", field="out")
    flags.add("--seed", type=int)
    flags.add("--family", choices=("sigma", "alpha"))
    config = flags.config(parser.parse_args(argv))
    try:
        path = init_tiny(config.out, config.seed, config.family)
    except FileExistsError as error:
        raise UserError(str(error)) from None
    except OSError as error:  # a read-only parent, a full disk
        raise UserError(f"cannot write {config.out} ({os_error_text(error)}); choose a folder you can write to") from None
    print(f"wrote a tiny PixArt-{'alpha' if config.family == 'alpha' else 'Sigma'} pipeline to {path}")
    return 0
