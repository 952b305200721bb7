"""``pixart-tune prepare``: a folder of images (or a dataset) into a cached, bucketed training set."""

from __future__ import annotations

import errno
from pathlib import Path

from pixart_tune.commands.parsing import ConfigFlags, verb_parser
from pixart_tune.errors import UserError
from pixart_tune.fsutil import os_error_text, printable

SUMMARY = "scan, caption, bucket and cache a folder of images or a dataset"


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str]) -> int:
    from pixart_tune.base import DTYPE_CHOICES, REPORT, RESOLUTIONS
    from pixart_tune.data.buckets import CROPS
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset, summary
    from pixart_tune.data.sources import SOURCE_KINDS

    parser = verb_parser(
        prog="pixart-tune prepare",
        description="Scan, validate, caption, bucket and cache a folder of images (or a Hugging Face dataset) for training. "
        "SRC is only read. See docs/prepare.md.",
    )
    flags = ConfigFlags(parser, PrepareConfig)
    flags.add("SRC", field="source")
    flags.add("--out")
    flags.add("--model")
    flags.add("--components")
    flags.add("--resolution", type=int, choices=RESOLUTIONS)
    flags.add("--source-kind", choices=SOURCE_KINDS)
    flags.add("--split")
    flags.add("--image-column")
    flags.add("--caption-column")
    flags.add("--mask-column")
    flags.add("--mask-from-alpha", action="store_true")
    flags.add("--caption-order", type=_names, help="comma list of sidecar, metadata, filename, captioner: where captions come from, first hit wins")
    flags.add("--captioner")
    flags.add("--captioner-prompt")
    flags.add("--captioner-batch-size", type=int)
    flags.add("--trigger")
    flags.add("--prefix")
    flags.add("--suffix")
    flags.add("--caption-variants", action="store_true")
    flags.add("--crop", choices=CROPS)
    flags.add("--max-upscale", type=float)
    flags.add("--max-pixels", type=int)
    flags.add("--background")
    flags.add("--keep-duplicates", action="store_true")
    flags.add("--batch-size", type=int)
    flags.add("--text-batch-size", type=int)
    flags.add("--workers", type=int)
    flags.add("--device")
    flags.add("--vae-dtype", choices=("fp32", "bf16"))
    flags.add("--text-dtype", choices=DTYPE_CHOICES)
    flags.add("--text-8bit", action="store_true")
    flags.add("--no-progress", field="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    config = flags.config(args)

    try:
        report = prepare_dataset(config)
    except OSError as error:  # a full disk, or --out made unwritable while prepare ran
        where = printable(str(error.filename or config.out))
        fix = "free some space and re-run prepare" if error.errno == errno.ENOSPC else "fix it and re-run prepare"
        raise UserError(f"cannot write {where} ({os_error_text(error)}); {fix}: finished cache entries are kept") from None
    print(summary(report, config.out))
    if not report["accepted"]:
        raise UserError(f"no usable image in {config.source}: see the reasons above (also in {Path(config.out) / REPORT})")
    return 0
