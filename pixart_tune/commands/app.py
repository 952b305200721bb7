"""``pixart-tune app``: the preview and merge app, served on this computer."""

from __future__ import annotations

from pixart_tune.commands.parsing import ConfigFlags, verb_parser

SUMMARY = "open the preview and merge app in a browser"


def main(argv: list[str]) -> int:
    from pixart_tune.app import AppSettings, launch

    parser = verb_parser(
        prog="pixart-tune app",
        description="Open the preview and merge app in a browser: compare adapters with the base model, sweep scales, "
        "merge and fuse. It binds to 127.0.0.1 and reads and writes files only under the folders given here.",
    )
    flags = ConfigFlags(parser, AppSettings)
    flags.add("--model", field="models", action="append",
              help="base model folder or hub id (repeat to offer several; the first loads at start)")
    flags.add("--runs", help="folder searched for adapters (default: runs)")
    flags.add("--outputs")
    flags.add("--components")
    flags.add("--allow", action="append", help="another folder adapters and models may be read from (repeatable)")
    flags.add("--host")
    flags.add("--port", type=int)
    flags.add("--share", action="store_true")
    flags.add("--allow-hub", action="store_true")
    flags.add("--device")
    flags.add("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    launch(flags.config(args, base={"runs": "runs"}), say=lambda line: print(line, flush=True))
    return 0
