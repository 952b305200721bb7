"""Training across processes: kill -9 then --resume, and 2-process CPU DDP."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from safetensors.torch import load_file

from pixart_tune.training import checkpoint as ckpt
from pixart_tune.training.trainer import run
from tests.conftest import REPO
from tests.training_fixtures import TINY_RECIPE, cli_env, kill_train_when, red_dataset, tiny_config  # noqa: F401  (fixture)

# LoRA dropout, caption dropout, noise offset, min-SNR and accumulation all on: a
# resume must restore every RNG stream and the data position to match exactly.
RESUME = ["schedule.steps=24", "schedule.grad_accum=2", "lora.dropout=0.1", "data.caption_dropout=0.3",
          "diffusion.noise_offset=0.05", "schedule.lr_scheduler=cosine", "checkpoint.every=4", "checkpoint.keep_last=2",
          "logging.every=5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(model, data, out, *extra):
    return [f"model={model}", f"data.path={data}", f"output_dir={out}", "logging.report_to=[]", "validation.prompts=[]", *extra]


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_uninterrupted_adapter(tiny_model, red_dataset, tmp_path):
    killed = tmp_path / "killed"
    kill_train_when(_cli_args(tiny_model, red_dataset, killed, *RESUME), killed, step=8)
    resumed_from = ckpt.list_checkpoints(killed)[-1]
    assert 8 <= ckpt.load_checkpoint(resumed_from).state.step < 24

    run(tiny_config(tiny_model, red_dataset, killed, *RESUME), resume="latest", progress=False)
    straight = tmp_path / "straight"
    run(tiny_config(tiny_model, red_dataset, straight, *RESUME), progress=False)

    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all((expected[k] == actual[k]).all() for k in expected)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_two_process_cpu_ddp_writes_one_adapter(tiny_model, red_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = dict(cli_env(), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    # --multi_gpu with the accelerator on the CPU gives 2 gloo processes
    # (--cpu --num_processes 2 would silently run one).
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pixart_tune.cli", "train", str(TINY_RECIPE),
               *_cli_args(tiny_model, red_dataset, out, "schedule.steps=4", "checkpoint.every=2"), "--no-progress"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("the run's files are in") == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    checkpoint = ckpt.load_checkpoint(out / "checkpoints" / "step-000002")
    assert len(checkpoint.rng) == 2, "not two processes"
