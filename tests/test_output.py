"""What a person sees on the console: each verb's own summary and progress, no library noise.

Every test runs the real command in its own process, with stdout and stderr
together as a terminal shows them, and holds the output to a size that fits on a
screen. Those that need the hub point it at a closed port on 127.0.0.1 with an
empty cache, so no test can reach a network.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prepare_fixtures import WORDS, build_tiny_blip, encode, photo, write
from tests.browser_fixtures import free_port, stop_app, wait_until_up

REPO = Path(__file__).resolve().parents[1]
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago): connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, online: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXIES}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_DATASETS_OFFLINE="1")
    if online:  # as on a computer without a network that nobody told the toolkit about
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    else:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _pixart_tune(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """(exit code, stdout and stderr interleaved) of ``pixart-tune ARGS``."""
    done = subprocess.run([sys.executable, "-m", "pixart_tune.cli", *args], check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=cwd, timeout=600)
    return done.returncode, done.stdout


def _folder(root: Path, n: int, captions: bool = True) -> Path:
    """Camera-named photos (no caption from the file name), with or without a caption sidecar each."""
    for i in range(n):
        write(root / f"IMG_{i:04d}.jpg", encode(photo(300, 260, seed=i), "JPEG", quality=90))
        if captions:
            write(root / f"IMG_{i:04d}.txt", f"a photo of a {WORDS[i % len(WORDS)]}".encode())
    return root


# --------------------------------------------------------------------------- prepare


def test_prepare_with_an_overlong_caption_prints_its_summary_and_no_pad_tokens(tmp_path, tiny_model):
    """The pipeline's truncation warning printed the padded remainder of every caption in the batch (157 kB of <pad>)."""
    src = _folder(tmp_path / "src", 4)
    long_caption = " ".join(random.Random(0).choice(WORDS) for _ in range(2000))
    write(src / "IMG_0000.txt", long_caption.encode())
    code, out = _pixart_tune(["prepare", str(src), "--out", str(tmp_path / "out"), "--model", tiny_model, "--resolution", "256"],
                             _env(tmp_path), tmp_path)
    assert code == 0, out[-3000:]
    assert "<pad>" not in out and "Token indices sequence length" not in out, out[:3000]
    assert len(out) < 4000 and len(out.split("\n")) < 40, out[:3000]
    # The toolkit's own report of it stays.
    assert "captions over 300 T5 tokens" in out and "IMG_0000.jpg: 2001 tokens" in out
    assert "prepared 4 of 4 images" in out


@pytest.mark.parametrize("flag", ["--captioner", "--model"])
def test_a_hub_model_that_cannot_be_reached_is_one_line_at_once(tmp_path, tiny_model, flag):
    """Without a network the hub client retried each file six times with pauses (2 min 41 s), every line printed twice."""
    src = _folder(tmp_path / "src", 2, captions=False)
    model_id = "pixart-tune-tests/not-cached"
    models = ["--model", tiny_model, "--captioner", model_id] if flag == "--captioner" else ["--model", model_id]
    args = ["prepare", str(src), "--out", str(tmp_path / "out"), "--resolution", "256", *models]
    code, out = _pixart_tune(args, _env(tmp_path, online=True), tmp_path)
    assert code == 1
    assert "Retrying" not in out and "thrown while requesting" not in out and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out[-3000:]
    assert model_id in errors[0] and "cannot reach the Hugging Face Hub" in errors[0] and f"pass its folder to {flag}" in errors[0]
    assert len(out.split("\n")) < 10, out


def test_an_uncached_captioner_in_offline_mode_is_one_line(tmp_path, tiny_model):
    src = _folder(tmp_path / "src", 2, captions=False)
    args = ["prepare", str(src), "--out", str(tmp_path / "out"), "--resolution", "256", "--model", tiny_model,
            "--captioner", "pixart-tune-tests/not-cached"]
    code, out = _pixart_tune(args, _env(tmp_path), tmp_path)
    assert code == 1
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "'pixart-tune-tests/not-cached' is not in the local Hugging Face cache" in errors[0], out[-3000:]
    assert "HF_HUB_OFFLINE" in errors[0] and "--captioner" in errors[0]
    assert len(out.split("\n")) < 10, out


def _cache(hf_home: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a hub cache, as the hub client lays it out (its ``main`` pointing at it)."""
    commit = "0" * 40
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    write(repo / "refs" / "main", commit.encode())
    return repo / "snapshots" / commit


@pytest.mark.parametrize("flag", ["--captioner", "--model"])
def test_a_cached_model_loads_from_the_cache_when_the_hub_cannot_be_reached(tmp_path, tiny_model, flag):
    """No retries of the files the cache does not hold (optional ones such as adapter_config.json)."""
    env = _env(tmp_path, online=True)
    src = _folder(tmp_path / "src", 2, captions=flag == "--model")
    args = ["prepare", str(src), "--out", str(tmp_path / "out"), "--resolution", "256", "--no-progress"]
    if flag == "--captioner":
        build_tiny_blip(_cache(Path(env["HF_HOME"]), "pixart-tune-tests/tiny-blip"))
        args += ["--model", tiny_model, "--captioner", "pixart-tune-tests/tiny-blip", "--set", "caption_max_new_tokens=6"]
    else:
        shutil.copytree(tiny_model, _cache(Path(env["HF_HOME"]), "pixart-tune-tests/tiny-pixart"))
        args += ["--model", "pixart-tune-tests/tiny-pixart"]
    code, out = _pixart_tune(args, env, tmp_path)
    assert code == 0, out[-3000:]
    assert "Retrying" not in out and "thrown while requesting" not in out, out
    assert "prepared 2 of 2 images" in out and len(out.split("\n")) < 20, out
    if flag == "--captioner":
        assert "captions from: captioner 2" in out
        warnings = [line for line in out.splitlines() if "cannot reach the Hugging Face Hub" in line]
        assert len(warnings) == 1 and "from the local cache" in warnings[0], out


# --------------------------------------------------------------------------- app


def test_the_app_says_where_it_serves_and_rejected_values_leave_no_tracebacks(tmp_path, tiny_model):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    env = _env(tmp_path)
    env.pop("GRADIO_TEMP_DIR", None)
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    log = tmp_path / "app.log"
    command = [sys.executable, "-m", "pixart_tune.cli", "app", "--model", tiny_model, "--runs", str(runs), "--port", str(port)]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, process, log)
        client = Client(url, verbose=False)
        # Gradio's own check refuses a menu value that is not offered: shown to the user as an error.
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(tiny_model, "a cat", "", 0, 2, 4.5, "256x256", ["/not/offered"], {}, api_name="/generate")
        with pytest.raises(AppError, match="greater than maximum value 100"):
            client.predict(tiny_model, "a cat", "", 0, 100000, 4.5, "256x256", [], {}, api_name="/generate")
        # The app's own check refuses a seed out of range: a warning on the page.
        client.predict(tiny_model, "a cat", "", -5, 2, 4.5, "256x256", [], {}, api_name="/generate")
        deadline = time.monotonic() + 30
        while "serving at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_app(process)
    out = log.read_text()
    assert f"serving at http://127.0.0.1:{port}" in out and "Ctrl+C" in out, out[-3000:]
    assert "share=True" not in out and "Running on local URL" not in out, out[-3000:]
    assert "HTTP Request:" not in out and "Traceback" not in out, out[-3000:]
    assert len(out.split("\n")) < 25, out
