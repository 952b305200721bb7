"""``pixart-tune train``: a LoRA from a YAML recipe, with ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path

from pixart_tune.commands.parsing import verb_parser

SUMMARY = "train a LoRA from a YAML recipe"


def main(argv: list[str]) -> int:
    from accelerate import PartialState

    from pixart_tune.training.config import load_train_config
    from pixart_tune.training.outputs import describe_outputs
    from pixart_tune.training.trainer import run

    parser = verb_parser(
        prog="pixart-tune train",
        description="Train a PixArt-Sigma LoRA from a YAML recipe (see recipes/ and docs/training.md).",
        epilog="Example: pixart-tune train recipes/tiny_cpu.yaml data.path=prepared/ model=tiny/ output_dir=runs/tiny",
    )
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=5e-5 schedule.steps=200")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the latest checkpoint of output_dir, or from a checkpoint folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = load_train_config(args.recipe, args.overrides)
    adapter = run(config, resume=args.resume, progress=not args.no_progress)
    if PartialState().is_main_process:
        print("\n".join(describe_outputs(Path(config.output_dir), adapter)))
    return 0
