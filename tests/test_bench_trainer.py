"""The trainer benchmarks' code paths at tiny size: overhead, real-size memory, GPU check."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, realsize_memory, trainer_overhead
from bench.common import build_model_folder, prepare, write_images
from pixart_tune.tiny import tiny_transformer_config
from tests.conftest import REPO


@pytest.fixture(scope="module")
def small_workdir(tmp_path_factory) -> Path:
    """A one-layer model with 64-wide captions and four prepared 256 px images."""
    work = tmp_path_factory.mktemp("bench")
    model = build_model_folder(work / "model", tiny_transformer_config(layers=1, heads=2, head_dim=16), caption_channels=64)
    prepare(model, write_images(work / "images", 4), work / "prepared")
    return work


def test_model_folder_and_dataset_have_the_asked_shapes(small_workdir):
    config = json.loads((small_workdir / "model" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["caption_channels"]) == (1, 64)
    manifest = json.loads((small_workdir / "prepared" / "dataset.json").read_text())
    assert manifest["caption_channels"] == 64 and len(manifest["items"]) == 4
    assert {tuple(item["bucket"]) for item in manifest["items"]} == {(256, 256)}


def test_bare_loop_computes_the_trainers_loss(small_workdir, tmp_path):
    """Both sides of the overhead benchmark train the same model on the same batch."""
    config = trainer_overhead.trainer_config(small_workdir / "model", small_workdir / "prepared", tmp_path / "run", 2, 4)
    side = trainer_overhead.TrainerSide(config)
    batch = side.batch()
    bare = trainer_overhead.BareSide(small_workdir / "model", batch, 4, 1e-3, torch.float32)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents.shape, generator=generator)
    t = torch.randint(0, 1000, (len(batch),), generator=generator)
    with torch.no_grad():
        expected = side.trainer.loss_for(batch.latents, noise, t, batch.embeds, batch.mask)
        assert torch.allclose(bare.loss(batch.latents, noise, t), expected, rtol=1e-5)
    side.trainer.cleanup()


def test_overhead_benchmark_times_both_loops_and_reports(small_workdir, tmp_path, capsys):
    timings = trainer_overhead.measure(small_workdir / "model", small_workdir / "prepared", tmp_path / "run", rounds=2, steps=3, batch_size=2, rank=4)
    # The trainer's last step of each round ends the run, so it is not a step sample.
    assert len(timings["pixart-tune train"].samples) == 2 * 2
    assert len(timings["bare PyTorch loop"].samples) == 2 * 3
    assert len(timings["ratio"].samples) == 2
    assert all(s > 0 for t in timings.values() for s in t.samples)
    # The real train loop ran: it saved its adapter at the end of each round.
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    settings = argparse.Namespace(rounds=2, steps=3, batch_size=2, rank=4, layers=1, heads=2, head_dim=16)
    text, ratio = trainer_overhead.report(timings, settings)
    assert ratio == pytest.approx(timings["pixart-tune train"].median / timings["bare PyTorch loop"].median)
    assert "| pixart-tune train |" in text and "ratio of the two loops" in text


def test_realsize_child_proves_no_text_encoder(small_workdir, tmp_path):
    """The measured subprocess (the real Trainer) on the small model: RSS, steps, the proof."""
    result = realsize_memory.run_child(small_workdir / "model", small_workdir / "prepared", tmp_path / "run", True, 1, 2)
    assert len(result["step_s"]) == 2 and all(math.isfinite(x) for x in result["loss"])
    assert result["peak_rss_gib"] >= result["rss_after_setup_gib"] > 0
    assert result["text_encoder_on_disk"] and realsize_memory.no_text_encoder(result), result
    assert result["resident_tensor_elements"] >= result["transformer_parameters"] > result["lora_parameters"] > 0


def test_text_encoder_evidence_sees_a_loaded_t5(small_workdir):
    """The proof's negative control: with T5 loaded, the same checks fail."""
    from pixart_tune.models import load_text_encoder, load_transformer

    transformer = load_transformer(str(small_workdir / "model"))
    encoder = load_text_encoder(str(small_workdir / "model"))
    evidence = realsize_memory.text_encoder_evidence(transformer)
    assert "T5EncoderModel" in evidence["t5_objects"]
    assert evidence["foreign_tensor_elements"] >= sum(p.numel() for p in encoder.parameters())
    assert not realsize_memory.no_text_encoder(evidence)


def test_realsize_plan_as_cpu_rss_removes_the_cuda_context(small_workdir, tmp_path):
    plan = realsize_memory.plan_rows(small_workdir / "model", small_workdir / "prepared", tmp_path, False, 1)
    assert realsize_memory.cpu_equivalent(plan, 0.5) == pytest.approx(plan.total_gib - 1.0 + 0.5)


def test_gpu_check_tiny_mode_runs_every_section(tmp_path):
    """``bench/gpu_check.py --tiny`` end to end on the CPU: training table, FLOPs, plan, T5."""
    out = tmp_path / "report.md"
    code = gpu_check.main(["--tiny", "--only", "256", "--out", str(out), "--t5-prompts", "4"])
    text = out.read_text()
    assert code == 0, text
    rows = [line for line in text.splitlines() if re.match(r"\| 256 ", line)]
    assert len(rows) == 4  # batch 1 and 2, checkpointing off and on
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "ok", row
        samples_per_s, tflop, plan = float(cells[5]), float(cells[7]), float(cells[14])
        assert samples_per_s > 0 and tflop > 0 and plan >= 1.0  # the plan holds its 1 GiB CUDA context
    # FLOPs scale with the batch; checkpointing does not change model FLOPs.
    flops = {(r.split("|")[2].strip(), r.split("|")[3].strip()): float(r.split("|")[8]) for r in rows}
    assert flops[("2", "off")] == pytest.approx(2 * flops[("1", "off")], rel=0.01) and flops[("1", "on")] == flops[("1", "off")]
    t5_row = next(line for line in text.splitlines() if line.startswith("| tiny T5"))
    assert "| ok " in t5_row and float(t5_row.split("|")[8]) > 0
    assert re.search(r"commit \w+", text) and "date: 20" in text


def test_gpu_check_counts_the_real_xl2_flops():
    """1024 px, batch 1, rank-16 attention LoRA: about 15.7 TFLOP per forward + backward."""
    _, setting = gpu_check.parse(["--device", "cpu", "--skip-t5"])
    bench = gpu_check.TrainingBench(setting)
    assert bench.count_flops(1024) / 1e12 == pytest.approx(15.66, rel=0.01)


def test_gpu_check_recognises_out_of_memory():
    assert gpu_check.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_check.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not gpu_check.is_oom(ValueError("shapes do not match"))


def test_gpu_check_refuses_bad_options():
    with pytest.raises(SystemExit):
        gpu_check.parse(["--only", "768"])
    with pytest.raises(SystemExit):
        gpu_check.parse(["--checkpointing", "sometimes"])


def test_gpu_check_script_help_runs_standalone():
    process = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--help"], capture_output=True, text=True, cwd=REPO)
    assert process.returncode == 0 and "--tiny" in process.stdout
