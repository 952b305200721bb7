"""``pixart-tune plan``: a recipe's predicted peak GPU memory, without a GPU."""

from __future__ import annotations

import dataclasses
import math

from pixart_tune.commands.parsing import verb_parser
from pixart_tune.errors import UserError

SUMMARY = "predict the peak GPU memory of a recipe, without a GPU"


def main(argv: list[str]) -> int:
    from pixart_tune.training.autoplan import describe, options, resolve_auto
    from pixart_tune.training.config import load_train_config
    from pixart_tune.training.memory import plan_memory, resolution_of
    from pixart_tune.training.optim import optimizer_advice

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
    resolution = resolution_of(config)
    budget = args.budget_gb if args.budget_gb is not None else config.memory_budget_gb
    config, auto = resolve_auto(dataclasses.replace(config, memory_budget_gb=budget), resolution)
    plan = plan_memory(config, resolution, budget)
    print(f"pixart-tune plan: {args.recipe}")
    if auto is not None:
        print(f"gradient_checkpointing auto -> {describe(auto.checkpointing)}")
    print(plan.table())
    for line in optimizer_advice(config.optim, config.schedule.lr_scheduler):
        print(f"advice: {line}")
    found = options(config, resolution, budget)
    print()
    print(choices_table(found, budget))
    return 0 if plan.fits else 3


def choices_table(found, budget: float) -> str:
    """Predicted peak (GiB) of each batch size x checkpointing mode, and the fastest that fits."""
    from pixart_tune.training.autoplan import describe, fastest

    modes = list(dict.fromkeys(o.checkpointing for o in found))
    batches = list(dict.fromkeys(o.batch_size for o in found))
    peaks = {(o.batch_size, o.checkpointing): o for o in found}
    header = ["batch"] + [f"ckpt={str(m).lower()}" for m in modes]
    lines = [f"predicted peak GiB by batch size and gradient_checkpointing (budget {budget:g} GiB; * fits):", "  ".join(f"{h:>11}" for h in header)]
    for batch in batches:
        cells = [f"{peaks[batch, m].plan.peak_gib:10.1f}{'*' if peaks[batch, m].fits else ' '}" for m in modes]
        lines.append("  ".join([f"{batch:>11}", *cells]))
    lines.append("estimated compute per sample: " + ", ".join(f"ckpt={str(m).lower()} {peaks[batches[0], m].cost:.2f}x" for m in modes))
    best = fastest(found)
    lines.append(
        f"fastest that fits: data.batch_size={best.batch_size} gradient_checkpointing={str(best.checkpointing).lower()}"
        if best else f"nothing fits {budget:g} GiB: lower the resolution or the rank, or use a larger GPU"
    )
    return "\n".join(lines)
