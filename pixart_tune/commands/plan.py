"""``pixart-tune plan``: a recipe's predicted peak GPU memory, without a GPU."""

from __future__ import annotations

import math

from pixart_tune.commands.parsing import verb_parser
from pixart_tune.errors import UserError

SUMMARY = "predict the peak GPU memory of a recipe, without a GPU"


def main(argv: list[str]) -> int:
    from pixart_tune.training.config import load_train_config
    from pixart_tune.training.memory import plan_memory, resolution_of

    parser = verb_parser(
        prog="pixart-tune plan",
        description="Predict the peak GPU memory of a training recipe, without a GPU (see docs/training.md).",
    )
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.batch_size=4")
    parser.add_argument("--budget-gb", type=float, help="GPU memory to fit in, GiB (default: the recipe's memory_budget_gb)")
    args = parser.parse_args(argv)
    if args.budget_gb is not None and not (math.isfinite(args.budget_gb) and args.budget_gb > 0):
        raise UserError(f"--budget-gb {args.budget_gb:g}: give the GPU memory in GiB, a positive number such as 24")
    config = load_train_config(args.recipe, args.overrides)
    plan = plan_memory(config, resolution_of(config), args.budget_gb)
    print(f"pixart-tune plan: {args.recipe}")
    print(plan.table())
    return 0 if plan.fits else 3
