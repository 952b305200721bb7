"""Benchmark 2: images per second of prepare's image stage against a naive PIL loop, and its memory.

Both sides turn the same folder of generated JPEG photos (800 to 2000 px a side,
varied aspect ratios, quality 90) into crops of their aspect-ratio bucket, in one
process, interleaved round by round so both see the same machine load:

* **prepare**: ``pixart_tune.data.prepare.bucketed_images``, prepare's own image
  stage with no model: scan the folder, read each file, decode it fully (JPEGs
  reduced by DCT scaling when much bigger than the bucket), validate it, apply its
  EXIF orientation, convert it to RGB, hash its pixels, choose its bucket, resize
  (Lanczos) and crop, on ``--workers`` threads (default: one per core).
* **naive**: one process, one thread, per file: ``Image.open``, ``convert("RGB")``,
  resize (Lanczos, the same filter) to cover the nearest bucket, center crop.

Memory: the peak RSS of a fresh process running the prepare stage over 100 and
over 2,000 of the images (``--rss-images``); flat means the larger run peaks no
higher than the smaller plus noise.

The default resolution, 512, puts these images 1.5 to 4 times over their bucket:
the ratio of 12-megapixel phone photos to the 1024 buckets PixArt-Sigma trains on.
``--resolution 1024`` measures the case where no JPEG can be decoded reduced and
only the threads help.

    python bench/prepare_throughput.py              # ~3 minutes on 2 CPU cores (generates 2,000 photos once)
    python bench/prepare_throughput.py --quick      # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, interleave, machine, table, timed

GOAL = 1.5
PHOTO_VERSION = 1  # bump when make_photo changes, so cached folders are made again


def make_photo(index: int, min_side: int, max_side: int) -> "Image.Image":
    """A photo-like RGB image of a random size: smooth shapes plus finer texture and sensor-like noise.

    Deterministic in ``index``. Smooth content compresses like a photo, and the
    texture keeps JPEG's entropy decoder about as busy as on a real one (pure noise
    would be far slower to decode than any photo, flat colour far faster).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    cell = int(rng.integers(max(width, height) // 8, max(width, height) // 3))
    grid = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    shapes = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    texture = _texture()
    dy, dx = (int(v) for v in rng.integers(0, texture.shape[0], 2))
    tiled = np.roll(texture, (dy, dx), (0, 1))
    reps = (height // tiled.shape[0] + 1, width // tiled.shape[1] + 1, 1)
    shapes += np.tile(tiled, reps)[:height, :width]
    return Image.fromarray(np.clip(shapes, 0, 255).astype(np.uint8))


_TEXTURE = None


def _texture():
    """A seamless 512 px tile of mid-size blobs and noise around zero, made once per process."""
    global _TEXTURE
    if _TEXTURE is None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(12345)
        # 3 x 3 copies of one 32-cell grid, upsampled: the middle copy joins its neighbours without a seam
        grid = np.tile(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (3, 3, 1))
        blobs = np.asarray(Image.fromarray(grid).resize((1536, 1536), Image.Resampling.BICUBIC), np.int16)[512:1024, 512:1024]
        _TEXTURE = (blobs - 128) // 3 + rng.normal(0, 5, (512, 512, 3)).astype(np.int16)
    return _TEXTURE


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, index, min_side, max_side = job
    tmp = path.with_name(f".{path.name}.tmp")
    make_photo(index, min_side, max_side).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)


def photo_folder(root: Path, count: int, min_side: int = 800, max_side: int = 2000, captions: bool = False) -> Path:
    """A folder of ``count`` generated JPEGs (made once in ``root``, reused by later runs), hard links into a pool."""
    pool = root / f"pool-{min_side}-{max_side}-v{PHOTO_VERSION}"
    pool.mkdir(parents=True, exist_ok=True)
    missing = [(pool / f"{i:05d}.jpg", i, min_side, max_side) for i in range(count) if not (pool / f"{i:05d}.jpg").exists()]
    if missing:
        print(f"generating {len(missing)} photos in {pool} ...", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(os.cpu_count()) as workers:
            list(workers.map(_write_photo, missing, chunksize=8))
    folder = root / f"set-{min_side}-{max_side}-v{PHOTO_VERSION}-{count}{'-captioned' if captions else ''}"
    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(exist_ok=True)
        for i in range(count):
            name = f"{i:05d}.jpg"
            if not (tmp / name).exists():
                try:
                    os.link(pool / name, tmp / name)
                except OSError:  # another file system: copy
                    (tmp / name).write_bytes((pool / name).read_bytes())
            if captions:
                (tmp / f"{i:05d}.txt").write_text(caption(i), encoding="utf-8")
        os.replace(tmp, folder)
    return folder


def caption(index: int) -> str:
    import random

    words = ["a", "photo", "of", "red", "blue", "cat", "dog", "house", "tree", "sky", "on", "in", "the", "small", "big", "wooden", "table"]
    rng = random.Random(index)
    return " ".join(rng.choice(words) for _ in range(rng.randint(6, 20)))


def naive_crops(folder: Path, resolution: int) -> int:
    """The loop one writes without thinking about speed; the same buckets, filter and crop as prepare."""
    from PIL import Image

    from pixart_tune.data.buckets import cover_scale, crop_box, nearest_bucket

    count = 0
    for path in sorted(folder.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        bucket = nearest_bucket(image.height, image.width, resolution)
        scale = cover_scale((image.height, image.width), bucket)
        size = (max(bucket[0], math.ceil(image.height * scale - 1e-6)), max(bucket[1], math.ceil(image.width * scale - 1e-6)))
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        crop = image.crop(crop_box(size, bucket, "center"))
        assert crop.size == (bucket[1], bucket[0])
        count += 1
    return count


def prepare_crops(folder: Path, resolution: int, workers: int) -> int:
    from pixart_tune.data.prepare import PrepareConfig, bucketed_images
    from pixart_tune.data.stage import Bucketed

    config = PrepareConfig(source=str(folder), out=str(folder.parent / "unused"), resolution=resolution, workers=workers, progress=False)
    count = 0
    for entry, outcome in bucketed_images(config):
        if not isinstance(outcome, Bucketed):
            raise RuntimeError(f"{entry.source} was skipped: {outcome.reason}")
        assert outcome.pixels is not None and outcome.pixels.size == (outcome.bucket[1], outcome.bucket[0])
        count += 1
    return count


def rss_child(folder: Path, resolution: int, workers: int) -> None:
    """Runs in a fresh process: the prepare stage over ``folder``; prints its peak RSS as JSON."""
    import pixart_tune.data.prepare  # noqa: F401  (imports are not the stage's time)

    start = time.perf_counter()
    count = prepare_crops(folder, resolution, workers)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB (Linux)
    print(json.dumps({"images": count, "peak_rss_mib": peak, "seconds": seconds}))


def measure_rss(folders: list[Path], resolution: int, workers: int) -> list[dict]:
    """Peak RSS of a fresh process per folder; the processes run side by side (each one's peak is its own)."""
    children = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(folder), "--resolution", str(resolution), "--workers", str(workers)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for folder in folders
    ]
    results = []
    for child in children:
        out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the memory run failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _warm(folder: Path) -> None:
    """Reads every file once, so neither side pays for a cold disk cache."""
    for path in folder.glob("*.jpg"):
        path.read_bytes()


def run(images: int, rounds: int, resolution: int, workers: int, rss_images: list[int], workdir: Path) -> dict:
    # Photos first, in worker processes forked before torch is imported here.
    folder = photo_folder(workdir, images)
    for count in rss_images:
        photo_folder(workdir, count)
    _warm(folder)
    from pixart_tune.data.stage import resolve_workers

    threads = resolve_workers(workers)
    print(f"{machine()}; commit {git_commit()}; load average {os.getloadavg()[0]:.1f}; {images} JPEGs 800-2000 px, resolution {resolution}, {rounds} rounds, prepare on {threads} threads", flush=True)

    def side(fn):
        def one() -> float:
            counted = []
            seconds = timed(lambda: counted.append(fn()))
            if counted[0] != images:
                raise RuntimeError(f"made {counted[0]} crops out of {images} images")
            return seconds

        return one

    timings = interleave({"prepare": side(lambda: prepare_crops(folder, resolution, workers)), "naive": side(lambda: naive_crops(folder, resolution))}, rounds)
    rates = {name: [images / s for s in t.samples] for name, t in timings.items()}
    ratios = [n / p for p, n in zip(timings["prepare"].samples, timings["naive"].samples)]

    def spread(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[int(0.1 * (len(ordered) - 1))]:.1f} - {ordered[int(round(0.9 * (len(ordered) - 1)))]:.1f}"

    rows = [
        [f"prepare stage ({threads} threads)", f"{statistics.median(rates['prepare']):.1f}", spread(rates["prepare"]), f"{timings['prepare'].median:.2f}"],
        ["naive PIL loop (1 thread)", f"{statistics.median(rates['naive']):.1f}", spread(rates["naive"]), f"{timings['naive'].median:.2f}"],
    ]
    print()
    print(table(["side", "images/s (median)", "images/s (p10 - p90)", "seconds per pass (median)"], rows))
    ratio = statistics.median(rates["prepare"]) / statistics.median(rates["naive"])
    print(f"\nspeed-up, ratio of medians: {ratio:.2f}x; per round: median {statistics.median(ratios):.2f}x, p10 - p90 {spread(ratios)}x; load average now {os.getloadavg()[0]:.1f}")

    memory = measure_rss([photo_folder(workdir, count) for count in rss_images], resolution, workers)
    if memory:
        print()
        print(table(["images (one fresh process each)", "peak RSS (MiB)"], [[m["images"], f"{m['peak_rss_mib']:.0f}"] for m in memory]))
    growth = memory[-1]["peak_rss_mib"] - memory[0]["peak_rss_mib"] if len(memory) > 1 else 0.0
    line = f"prepare_throughput: {ratio:.2f}x naive (goal >= {GOAL}x) at resolution {resolution}"
    if memory:
        line += "; peak RSS " + ", ".join(f"{m['peak_rss_mib']:.0f} MiB at {m['images']} images" for m in memory)
        line += f" ({growth:+.0f} MiB)" if len(memory) > 1 else ""
    print()
    print(line)
    return {"ratio": ratio, "round_ratios": ratios, "prepare": timings["prepare"].samples, "naive": timings["naive"].samples, "memory": memory, "line": line}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="images per timed pass (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--resolution", type=int, default=512, choices=(256, 512, 1024, 2048))
    parser.add_argument("--workers", type=int, default=0, help="prepare's decode threads (default 0: one per core)")
    parser.add_argument("--rss-images", default="100,2000", help="image counts of the memory runs, comma-separated ('' for none)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pixart-tune-bench", help="where generated photos are kept between runs")
    parser.add_argument("--quick", action="store_true", help="100 images, 3 rounds, memory at 50 and 400 images")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        rss_child(args.rss_child, args.resolution, args.workers)
        return None
    if args.quick:
        args.images, args.rounds, args.rss_images = 100, 3, "50,400"
    rss_images = sorted(int(v) for v in args.rss_images.split(",") if v.strip())
    return run(args.images, args.rounds, args.resolution, args.workers, rss_images, args.workdir)


if __name__ == "__main__":
    main()
