"""``pixart-tune merge``: merge adapters, resize one by SVD, or fuse into the base model."""

from __future__ import annotations

from pixart_tune.commands.parsing import ConfigFlags, verb_parser

SUMMARY = "merge adapters, resize one by SVD, or fuse into the base model"


def main(argv: list[str]) -> int:
    from pixart_tune.adapters.merge import METHODS, MergeConfig, merge

    parser = verb_parser(
        prog="pixart-tune merge",
        description="Merge adapters into one, resize one to a lower rank by SVD, or fuse adapters into the base model.",
        epilog="examples:\n"
        "  pixart-tune merge a/ b:0.5 --method svd --rank 16 --out merged/\n"
        "  pixart-tune merge a/ --resize 8 --out a-r8/\n"
        "  pixart-tune merge a/:0.8 --fuse PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --out fused-model/",
        raw=True,
    )
    flags = ConfigFlags(parser, MergeConfig)
    flags.add("ADAPTER[:WEIGHT]", field="adapters", nargs="+")
    flags.add("--out")
    flags.add("--method", choices=METHODS)
    flags.add("--rank", type=int)
    flags.add("--resize", type=int, metavar="RANK")
    flags.add("--fuse", metavar="MODEL")
    flags.add("--dtype", choices=["fp32", "bf16", "fp16"])
    flags.add("--overwrite", action="store_true")
    flags.add("--allow-pickle-runs-code", action="store_true")
    outcome = merge(flags.config(parser.parse_args(argv)))
    for note in outcome.notes:
        print(note)
    print(outcome.summary)
    return 0
