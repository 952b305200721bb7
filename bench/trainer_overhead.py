"""Benchmark 1: what `pixart-tune train` costs per step beyond a bare PyTorch loop.

Both sides train the same mid-size PixArt-Sigma model (4 layers, width 256 = 4 heads
x 64, T5-XXL-wide 4096-channel captions) at 256 px with a rank-16 attention LoRA and
PyTorch AdamW, from one prepared dataset whose items all share a shape, in one
process, interleaved round by round so both see the same machine load:

* **trainer**: the real ``Trainer.train()`` loop of the train command, run for
  ``--steps`` optimizer steps per round (``schedule.steps`` is raised by that much
  before each call). Every step reads its batch from the cache on disk, re-seeds its
  generator, runs inside accelerate's ``accumulate``, clips the gradient norm, steps
  the LR schedule, and logs (with TensorBoard) every ``logging.every`` steps, as the
  command does. A step is timed from one ``train_step`` entry to the next, so it
  holds all of the loop's per-step work; the call's end (final save) is not a step.
* **bare**: forward, loss, backward, optimizer step, zero_grad, on one batch kept in
  memory; nothing else.

Checkpoints, validation, min-SNR weighting and caption dropout are off (they are
features, not overhead); gradient clipping stays on (every recipe clips).

    python bench/trainer_overhead.py            # ~2 minutes on 2 CPU cores
    python bench/trainer_overhead.py --rounds 3 --steps 4   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Timing, build_model_folder, git_commit, interleave, load_average, machine, prepare, table, write_images

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
GOAL = 1.10


def mid_transformer_config(layers: int = 4, heads: int = 4, head_dim: int = 64) -> dict:
    from pixart_tune.tiny import tiny_transformer_config

    return tiny_transformer_config(layers=layers, heads=heads, head_dim=head_dim)


def build_workdir(work: Path, images: int, layers: int, heads: int, head_dim: int, caption_channels: int) -> tuple[Path, Path]:
    """(model folder, prepared dataset): one bucket, one caption length."""
    model = build_model_folder(work / "model", mid_transformer_config(layers, heads, head_dim), caption_channels)
    source = write_images(work / "images", images, (256, 256))
    return model, prepare(model, source, work / "prepared")


def trainer_config(model: Path, data: Path, out: Path, batch_size: int, rank: int):
    from pixart_tune.training.config import load_train_config

    return load_train_config(
        RECIPE,
        [
            f"model={model}", f"data.path={data}", f"output_dir={out}", f"data.batch_size={batch_size}",
            "dtype=fp32", "validation.prompts=[]", "checkpoint.every=0", "gradient_checkpointing=false",
            "optim.name=adamw", "data.caption_dropout=0", "diffusion.min_snr_gamma=null",
            f"lora.rank={rank}", f"lora.alpha={rank}", "logging.every=10", "logging.report_to=[tensorboard]",
            "schedule.steps=1000000", "schedule.lr_scheduler=constant", "schedule.warmup_steps=0",
        ],
    )


class TrainerSide:
    """Runs the real ``Trainer.train()`` loop ``steps`` steps at a time, timing each step."""

    def __init__(self, config):
        from pixart_tune.training.trainer import Trainer

        self.trainer = Trainer(config, progress=False)
        self.trainer.setup()
        self.entries: list[float] = []
        step = self.trainer.train_step

        def timed_step(batch):
            self.entries.append(time.perf_counter())
            return step(batch)

        self.trainer.train_step = timed_step  # the loop calls self.train_step

    def run(self, steps: int) -> list[float]:
        """Seconds of each loop step but the last (whose end is the run's end, not a step)."""
        self.entries.clear()
        self.trainer.config.schedule.steps = self.trainer.state.step + steps
        self.trainer.train()
        return [b - a for a, b in zip(self.entries, self.entries[1:])]

    def batch(self):
        return self.trainer.next_batch()


class BareSide:
    """Forward, loss, backward, AdamW step: the minimum a LoRA step is."""

    def __init__(self, model: Path, batch, rank: int, lr: float, dtype: torch.dtype):
        from pixart_tune.adapters.lora import LoraSettings, inject_lora, trainable_parameters
        from pixart_tune.models import load_noise_scheduler, load_transformer

        self.transformer = load_transformer(str(model), dtype)
        inject_lora(self.transformer, LoraSettings(rank=rank, alpha=rank, targets="attention"))
        self.transformer.train()
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.transformer), lr=lr)
        self.alphas = load_noise_scheduler(str(model)).alphas_cumprod
        self.latents, self.embeds, self.mask = batch.latents, batch.embeds, batch.mask
        self.dtype = dtype

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas[t].view(-1, 1, 1, 1)
        noisy = (abar.sqrt() * latents + (1 - abar).sqrt() * noise).to(self.dtype)
        out = self.transformer(
            noisy, encoder_hidden_states=self.embeds, encoder_attention_mask=self.mask, timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(out[:, : latents.shape[1]].float(), noise)

    def step(self) -> None:
        noise = torch.randn_like(self.latents)
        t = torch.randint(0, 1000, (self.latents.shape[0],))
        self.loss(self.latents, noise, t).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times


def measure(model: Path, data: Path, out: Path, rounds: int, steps: int, batch_size: int, rank: int) -> dict[str, Timing]:
    config = trainer_config(model, data, out, batch_size, rank)
    trainer = TrainerSide(config)
    bare = BareSide(model, trainer.batch(), rank, config.optim.lr, torch.float32)
    samples: dict[str, list[float]] = {"pixart-tune train": [], "bare PyTorch loop": []}
    sides = {"pixart-tune train": trainer, "bare PyTorch loop": bare}
    # Warm-up: first calls allocate, fill caches and build kernels; not measured.
    for side in sides.values():
        side.run(max(steps, 3))

    def block(name):
        def run() -> float:
            times = sides[name].run(steps)
            samples[name] += times
            return statistics.median(times)

        return run

    per_round = interleave({name: block(name) for name in sides}, rounds)
    trainer.trainer.cleanup()
    timings = {name: Timing(name, values) for name, values in samples.items()}
    # The same ratio round by round: its spread says how much the machine's load moved it.
    ratios = [a / b for a, b in zip(per_round["pixart-tune train"].samples, per_round["bare PyTorch loop"].samples)]
    timings["ratio"] = Timing("ratio per round", ratios)
    return timings


def report(timings: dict[str, Timing], args) -> tuple[str, float]:
    bare = timings["bare PyTorch loop"]
    rows = []
    for timing in (timings["pixart-tune train"], bare):
        lo, hi = timing.spread
        mean = sum(timing.samples) / len(timing.samples)
        rows.append([
            timing.name, len(timing.samples), f"{timing.median * 1e3:.1f}", f"{lo * 1e3:.1f} - {hi * 1e3:.1f}",
            f"{mean * 1e3:.1f}", f"{timing.median / bare.median:.3f}x",
        ])
    ratio = timings["pixart-tune train"].median / bare.median
    per_round = timings["ratio"]
    lo, hi = per_round.spread
    lines = [
        f"trainer overhead: {args.layers} layers x width {args.heads * args.head_dim}, 256 px, batch {args.batch_size}, "
        f"LoRA rank {args.rank} (attention), AdamW, fp32, {torch.get_num_threads()} threads",
        f"machine: {machine()}; torch {torch.__version__}; commit {git_commit()}; {time.strftime('%Y-%m-%d')}",
        f"{args.rounds} interleaved rounds x {args.steps} steps (trainer: {args.steps - 1} timed per round); warm-up excluded; "
        f"{getattr(args, 'load_before', 'load average unknown')} before, {load_average()} after",
        "",
        table(["loop", "steps", "median ms", "p10 - p90 ms", "mean ms", "median vs bare"], rows),
        "",
        f"ratio of the two loops' median step times within each round: median {per_round.median:.3f}, "
        f"p10 - p90 {lo:.3f} - {hi:.3f} over {len(per_round.samples)} rounds",
    ]
    return "\n".join(lines), ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--steps", type=int, default=11, help="steps per side per round (default 11)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--caption-channels", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", type=Path, help="keep the model and dataset here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = args.workdir or Path(tmp)
        if not (work / "prepared" / "dataset.json").is_file():
            print("building the model folder and preparing the dataset ...", flush=True)
            build_workdir(work, max(2 * args.batch_size, 8), args.layers, args.heads, args.head_dim, args.caption_channels)
        run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=work))
        args.load_before = load_average()
        timings = measure(work / "model", work / "prepared", run_dir, args.rounds, args.steps, args.batch_size, args.rank)
    text, ratio = report(timings, args)
    print(text)
    print()
    verdict = "meets" if ratio <= GOAL else "MISSES"
    print(f"trainer_overhead: {ratio:.3f}x bare loop (goal <= {GOAL:.2f}; {verdict} it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
