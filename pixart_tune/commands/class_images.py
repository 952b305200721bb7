"""``pixart-tune class-images``: the base model's images of a class, for prior preservation."""

from __future__ import annotations

import errno
import shlex
from pathlib import Path

from pixart_tune.commands.parsing import ConfigFlags, verb_parser
from pixart_tune.errors import UserError
from pixart_tune.fsutil import os_error_text, printable

SUMMARY = "draw class (regularization) images with the base model for prior preservation"


def main(argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from pixart_tune.class_images import ClassImagesConfig, make_class_images

    parser = verb_parser(
        prog="pixart-tune class-images",
        description="Draw COUNT images of PROMPT with the base model into a folder (class_00000.png ... each with a .txt "
        "caption holding the prompt), for prior preservation: prepare the folder, then train with it in data.extra as "
        "kind: class. Re-running continues: images there with the same prompt are kept, the missing ones drawn.",
    )
    flags = ConfigFlags(parser, ClassImagesConfig)
    flags.add("PROMPT", field="prompt", nargs="?")
    flags.add("--out")
    flags.add("--model")
    flags.add("--components")
    flags.add("--count", type=int)
    flags.add("--seed", type=int)
    flags.add("--steps", type=int)
    flags.add("--guidance", type=float)
    flags.add("--aspect", type=float)
    flags.add("--size")
    flags.add("--negative-prompt")
    flags.add("--device")
    flags.add("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    flags.add("--overwrite", action="store_true")
    config = flags.config(parser.parse_args(argv))

    bars: list[tqdm] = []  # made at the first report: a refused folder shows no bar

    def advance(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="class images", unit="image", total=total, initial=done))
        bars[0].update(done - bars[0].n)

    try:
        result = make_class_images(config, on_image=advance)
    except OSError as error:  # a full disk, or the folder made unwritable while it ran
        where = printable(str(error.filename or config.out))
        fix = "free some space and run again" if error.errno == errno.ENOSPC else "fix it and run again"
        raise UserError(f"cannot write {where} ({os_error_text(error)}); {fix}: the images written are kept") from None
    finally:
        for bar in bars:
            bar.close()
    out = str(result.out)
    name = Path(config.out).resolve().name or "class"
    print(f"{config.count} class images in {out} ({result.drawn} drawn now, {result.kept} were there)")
    if result.beyond:
        print(f"note: {out} holds {result.beyond} more class_*.png past --count {config.count} (from an earlier run); prepare reads them too")
    print(
        f"next: pixart-tune prepare {shlex.quote(out)} --out {shlex.quote(f'prepared/{name}')} --model {shlex.quote(config.model)} "
        f"--resolution {result.resolution}"
    )
    print(f"then in the recipe: data.extra: [{{path: prepared/{name}, kind: class}}]")
    return 0
