"""``pixart-tune export``: an adapter in other tools' layouts, or a publish folder with a model card."""

from __future__ import annotations

from pixart_tune.commands.parsing import ConfigFlags, verb_parser

SUMMARY = "export an adapter to other tools' layouts, or a publish folder"


def main(argv: list[str]) -> int:
    from pixart_tune.adapters.export import FORMATS, ExportConfig, export

    parser = verb_parser(
        prog="pixart-tune export",
        description="Export an adapter to the layouts other tools load (one file per loader), or write a publish "
        "folder with a model card and samples, optionally uploading it to the Hugging Face Hub.",
        epilog="formats:\n" + "\n".join(f"  {k:<11} {v[1]}" for k, v in FORMATS.items()) + "\n\nexamples:\n"
        "  pixart-tune export runs/lora/adapter --format comfyui --out my_lora_comfyui.safetensors\n"
        "  pixart-tune export runs/lora/adapter --format all --out exported/\n"
        "  pixart-tune export runs/lora/adapter --publish publish/ --trigger sks --push-to-hub me/my-lora",
        raw=True,
    )
    flags = ConfigFlags(parser, ExportConfig)
    flags.add("adapter")
    flags.add("--format", choices=[*FORMATS, "all"])
    flags.add("--out")
    flags.add("--publish", metavar="FOLDER")
    flags.add("--name")
    flags.add("--base-model")
    flags.add("--trigger", action="append", help="trigger word for the card (repeat; default: recorded in the adapter)")
    flags.add("--license")
    flags.add("--tag", action="append", help="extra card tag (repeat)")
    flags.add("--samples", nargs="+")
    flags.add("--push-to-hub", metavar="REPO")
    flags.add("--private", action="store_true")
    flags.add("--overwrite", action="store_true")
    flags.add("--allow-pickle-runs-code", action="store_true")
    for line in export(flags.config(parser.parse_args(argv))):
        print(line)
    return 0
