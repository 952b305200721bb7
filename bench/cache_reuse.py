"""Benchmark 3: a second ``prepare`` over an unchanged folder, as a fraction of the first.

Each round prepares a folder of generated JPEG photos (400 to 1000 px, each with
a ``.txt`` caption) into a new output folder with the tiny PixArt-Sigma model at
256 px (the full pipeline: scan, decode, bucket, VAE latents, T5 embeddings,
manifest, report), then runs the same ``prepare_dataset`` again over the
unchanged folder. The second run must encode nothing and load neither the VAE nor
T5; it reads and hashes each file's bytes, finds it in the scan index, and checks
that its cache entries exist. Both runs are timed in one process, from the call
to its return (the Python imports are not part of either).

A last run after changing one image shows what a small edit costs: that image
alone is decoded and encoded (the VAE is loaded for it).

    python bench/cache_reuse.py             # 1 to 3 minutes on 2 CPU cores (the tiny VAE's first runs)
    python bench/cache_reuse.py --quick     # ~30 seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, peak_rss_gib, table, timed
from bench.prepare_throughput import make_photo, photo_folder

GOAL = 0.05


def tiny_model(workdir: Path) -> Path:
    from pixart_tune.tiny import init_tiny

    folder = workdir / "tiny-model"
    if not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        init_tiny(folder)
    return folder


def run(images: int, rounds: int, model: Path | None, workdir: Path, resolution: int = 256) -> dict:
    source = photo_folder(workdir, images, 400, 1000, captions=True)
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset

    model = model or tiny_model(workdir)
    print(f"{machine()}; commit {git_commit()}; load average {os.getloadavg()[0]:.1f}; {images} captioned JPEGs 400-1000 px, model {model}, resolution {resolution}, {rounds} rounds", flush=True)
    first, second, reports = [], [], []
    scratch = Path(tempfile.mkdtemp(prefix="cache-reuse-", dir=workdir))
    try:
        for r in range(rounds):
            config = PrepareConfig(source=str(source), out=str(scratch / f"round{r}"), model=str(model), resolution=resolution, progress=False)
            result = {}
            first.append(timed(lambda: result.update(first=prepare_dataset(config))))
            second.append(timed(lambda: result.update(second=prepare_dataset(config))))
            check_rerun(result["first"], result["second"])
            reports.append(result)
        # one image changed: only it is decoded and encoded again
        target = sorted(source.glob("*.jpg"))[0]
        original = target.read_bytes()
        changed = {}
        try:
            target.unlink()  # a hard link into the photo pool: replace it, never write through it
            make_photo(10**6, 400, 1000).save(target, "JPEG", quality=90)
            changed_seconds = timed(lambda: changed.update(report=prepare_dataset(config)))
        finally:
            target.unlink()
            target.write_bytes(original)
        counts = changed["report"]["counts"]
        if counts["latents_encoded"] != 1:
            raise RuntimeError(f"changing one image re-encoded {counts['latents_encoded']} latents")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    fractions = [b / a for a, b in zip(first, second)]

    def cell(values: list[float], digits: int = 3) -> tuple[str, str]:
        ordered = sorted(values)
        lo, hi = ordered[int(0.1 * (len(ordered) - 1))], ordered[int(round(0.9 * (len(ordered) - 1)))]
        return f"{statistics.median(values):.{digits}f}", f"{lo:.{digits}f} - {hi:.{digits}f}"

    counts = reports[-1]["second"]["counts"]
    rows = [
        ["first run (everything encoded)", *cell(first), f"{images / statistics.median(first):.1f}", ", ".join(reports[-1]["first"]["models_loaded"])],
        ["second run (folder unchanged)", *cell(second), f"{images / statistics.median(second):.0f}", ", ".join(reports[-1]["second"]["models_loaded"]) or "none"],
        ["one image changed", f"{changed_seconds:.3f}", "(1 run)", f"{images / changed_seconds:.0f}", ", ".join(changed["report"]["models_loaded"]) or "none"],
    ]
    print()
    print(table(["run", "seconds (median)", "seconds (p10 - p90)", "images/s", "models loaded"], rows))
    median_fraction, spread = cell(fractions, 4)
    print(f"\nsecond / first, per round: median {float(median_fraction):.2%}, p10 - p90 {spread}; second run: {counts['latents_reused']} latents and {counts['texts_reused']} texts reused, 0 encoded; peak RSS of this process {peak_rss_gib():.2f} GiB")
    fraction = statistics.median(fractions)
    line = f"cache_reuse: second run takes {fraction:.1%} of the first (goal <= {GOAL:.0%}), {images} images"
    print()
    print(line)
    return {"fraction": fraction, "fractions": fractions, "first": first, "second": second, "changed": changed_seconds, "line": line}


def check_rerun(first: dict, second: dict) -> None:
    """The second run must have reused everything and still reported everything."""
    counts = second["counts"]
    if counts["latents_encoded"] or counts["texts_encoded"] or second["models_loaded"]:
        raise RuntimeError(f"the second run encoded something: {counts}, loaded {second['models_loaded']}")
    for key in ("accepted", "skipped", "duplicates", "buckets", "caption_sources", "overlong_captions"):
        if first[key] != second[key]:
            raise RuntimeError(f"report.json differs between the runs in {key!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images in the folder (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="first + second run pairs (default 3)")
    parser.add_argument("--model", type=Path, help="pipeline folder (default: the tiny model, built once in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pixart-tune-bench", help="where generated photos and the tiny model are kept")
    parser.add_argument("--quick", action="store_true", help="40 images, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 40, 2
    return run(args.images, args.rounds, args.model, args.workdir)


if __name__ == "__main__":
    main()
