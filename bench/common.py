"""Shared helpers of the benchmarks: timing statistics, tables, peak memory."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import psutil


@dataclass
class Timing:
    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """(10th, 90th) percentile: robust to the odd stall of a shared machine."""
        ordered = sorted(self.samples)
        lo = ordered[int(0.1 * (len(ordered) - 1))]
        hi = ordered[int(round(0.9 * (len(ordered) - 1)))]
        return lo, hi


def interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, Timing]:
    """Calls each run once per round, in alternating order, collecting the seconds each returns.

    Interleaving makes both sides see the same machine load, so their ratio is
    meaningful even when absolute times drift.
    """
    results = {name: Timing(name, []) for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].samples.append(runs[name]())
    return results


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


# --- model folders and datasets the benchmarks train on ------------------------------


@contextlib.contextmanager
def default_dtype(dtype):
    """Creates parameters directly in ``dtype``: a 600 M-parameter model never exists in fp32."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model_folder(out, transformer_config: dict, caption_channels: int, dtype=None, seed: int = 0):
    """A PixArt-Sigma pipeline folder (diffusers layout) around a given transformer.

    The VAE and tokenizer are the tiny pipeline's; the text encoder is a one-layer T5
    whose output width is ``caption_channels`` (4096 = T5-XXL's), so ``prepare``
    writes embeddings of the real width while encoding stays cheap. The transformer
    is randomly initialised from ``transformer_config`` directly in ``dtype``
    (initialising 600 M parameters in fp32 first would double the time and memory).
    """
    from pathlib import Path

    import torch
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from pixart_tune.tiny import build_tiny_pipeline

    out = Path(out)
    pipe = build_tiny_pipeline(seed)
    tokenizer = pipe.tokenizer
    pipe.text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=caption_channels, d_kv=8, d_ff=16, num_layers=1, num_heads=1,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )
    with default_dtype(dtype or torch.float32):
        torch.manual_seed(seed)
        pipe.transformer = PixArtTransformer2DModel.from_config(dict(transformer_config, caption_channels=caption_channels))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_images(folder, count: int, size: tuple[int, int] = (256, 256), seed: int = 0):
    """``count`` random-noise PNGs of one size, all with one caption (so every batch has one text length)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.png")
        (folder / f"img_{i:04d}.txt").write_text("a photo of a red cat on a wooden table", encoding="utf-8")
    return folder


def prepare(model, source, out, resolution: int = 256):
    """``pixart-tune prepare`` of ``source`` into ``out`` with ``model``'s VAE and T5."""
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset

    prepare_dataset(PrepareConfig(source=str(source), out=str(out), model=str(model), resolution=resolution, progress=False))
    return out


def git_commit() -> str:
    """The short commit of the working tree (with ``+dirty`` when it has changes)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine() -> str:
    """CPU model, cores and memory, for the record."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def load_average() -> str:
    """The machine's 1-minute load average: other work on the cores moves every timing."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"
