"""``pixart-tune sample``: images and a comparison grid with any number of adapters."""

from __future__ import annotations

import argparse

from pixart_tune.commands.parsing import ConfigFlags, verb_parser

SUMMARY = "generate images with any number of adapters, and comparison grids"


def _scales(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"write comma-separated numbers, e.g. 0,0.5,1 (got {text!r})") from None


def main(argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from pixart_tune.sampling import SampleConfig, sample

    parser = verb_parser(
        prog="pixart-tune sample",
        description="Generate images with any number of adapters, save them as PNGs with their parameters, "
        "and write a comparison grid (base vs adapters with the same seeds, or a sweep of one adapter's scale).",
    )
    flags = ConfigFlags(parser, SampleConfig)
    flags.add("--model")
    flags.add("--components")
    flags.add("--prompt", field="prompts", action="append", help="a prompt (repeat for several)")
    flags.add("--prompts-file")
    flags.add("--negative-prompt")
    flags.add("--seeds", type=int, nargs="+")
    flags.add("--steps", type=int)
    flags.add("--guidance", type=float)
    flags.add("--aspect", type=float)
    flags.add("--size")
    flags.add("--adapter", field="adapters", action="append", metavar="PATH[:SCALE]",
              help="an adapter folder or .safetensors file in any supported layout, with an optional scale (repeat for several)")
    flags.add("--sweep", type=_scales, help="comma-separated scales of the first adapter, one grid row each, e.g. 0,0.5,1")
    flags.add("--no-base", field="base", action="store_false", help="leave out the base model row")
    flags.add("--separately", action="store_true")
    flags.add("--out")
    flags.add("--overwrite", action="store_true")
    flags.add("--device")
    flags.add("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    flags.add("--allow-pickle-runs-code", action="store_true")
    config = flags.config(parser.parse_args(argv))

    with tqdm(desc="sampling", unit="image") as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = sample(config, on_image=advance)
    print(f"wrote {len(result.images)} images and the comparison grid {result.grid}")
    return 0
