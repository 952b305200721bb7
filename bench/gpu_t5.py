"""The GPU check's T5-XXL caching section: prompts/s of prepare's own text encoder.

It runs last and in a subprocess of its own (``t5_in_subprocess``): a time cap can
stop it whatever it is doing, and the 4.7 B-parameter encoder's memory is given
back with the process instead of lingering into other peaks.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.common import default_dtype
from bench.gpu_env import GIB, PROMPT_WORDS, TOKENS, Setting, free_memory, is_oom, log, synchronize

@dataclasses.dataclass
class T5Result:
    precision: str = ""
    status: str = "ok"
    prompts: int = 0
    batch: int = 0
    load_seconds: float | None = None
    seconds: float | None = None
    peak_allocated: float | None = None
    parameters: int = 0

    @property
    def prompts_per_s(self) -> float | None:
        return self.prompts / self.seconds if self.seconds else None


def t5_in_subprocess(argv: list[str], cap: float) -> T5Result:
    """Runs ``gpu_check.py ARGV --t5-only`` and reads its result; after ``cap`` seconds it is killed."""
    script = Path(__file__).resolve().parent / "gpu_check.py"
    with tempfile.TemporaryDirectory(prefix="gpu_check_t5_") as folder:
        out = Path(folder) / "t5.json"
        log(f"[t5] in a subprocess, capped at {cap:.0f} s ...")
        try:
            # stderr passes through: its progress lines land in the log as they come.
            process = subprocess.run([sys.executable, str(script), *argv, "--t5-only", "--t5-json", str(out)],
                                     stdout=subprocess.DEVNULL, timeout=max(cap, 1.0))
        except subprocess.TimeoutExpired:
            return T5Result(status=f"skipped (time cap {cap:.0f} s reached)")
        if not out.exists():
            return T5Result(status=f"error (subprocess exited {process.returncode} without a result)")
        return T5Result(**json.loads(out.read_text(encoding="utf-8")))


def write_result(result: T5Result, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")


def t5_bench(setting: Setting) -> T5Result:
    """prompts/s of ``prepare``'s TextEncoder over 300-token prompts, 8-bit when bitsandbytes runs."""
    from pixart_tune.training.optim import bitsandbytes_usable

    result = T5Result(batch=setting.t5_batch)
    if time.monotonic() > setting.deadline:
        result.status = "skipped (time limit)"
        return result
    device = setting.device
    why_not_8bit = "8-bit needs CUDA" if device.type != "cuda" else bitsandbytes_usable(device)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_t5_") as folder:
            result.parameters = save_random_t5(setting, Path(folder))
            if why_not_8bit is None:
                try:
                    encode_throughput(setting, folder, True, result)
                    result.precision = "8-bit (bitsandbytes LLM.int8)"
                    return result
                except Exception as error:  # a broken 8-bit path still leaves the bf16 figure
                    if is_oom(error):
                        raise
                    log(traceback.format_exc())
                    why_not_8bit = f"8-bit failed: {type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
            result.precision = f"bf16 ({why_not_8bit})"
            encode_throughput(setting, folder, False, result)
    except Exception as error:
        log(traceback.format_exc())
        result.status = "OOM" if is_oom(error) else f"error ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    finally:
        free_memory(device)
    return result


def save_random_t5(setting: Setting, folder: Path) -> int:
    """A random T5 encoder (T5-XXL, or tiny) and a tokenizer saved in a model folder; its parameter count."""
    from transformers import T5Config, T5EncoderModel

    from pixart_tune.tiny import build_tiny_tokenizer

    log(f"[t5] initialising a random {'tiny' if setting.tiny else 'T5-XXL'} encoder and saving it ...")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    # On the GPU: initialising 4.7 B parameters there takes seconds, on the host minutes.
    with default_dtype(torch.bfloat16), torch.device(setting.device if setting.device.type == "cuda" else "cpu"):
        model = T5EncoderModel(T5Config(**setting.t5_config(), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    del model
    free_memory(setting.device)
    return parameters


def encode_throughput(setting: Setting, folder: str, eight_bit: bool, result: T5Result) -> None:
    """Loads the folder's encoder through prepare's TextEncoder and times encoding, into ``result``."""
    from pixart_tune.encoders import TextEncoder

    device = setting.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"[t5] loading it through prepare's loader ({'8-bit' if eight_bit else 'bf16'}) ...")
    start = time.perf_counter()
    encoder = TextEncoder(folder, device, torch.bfloat16, load_in_8bit=eight_bit, max_tokens=TOKENS)
    try:
        encoder.pipe  # loads tokenizer + encoder now, not inside the timed loop
        synchronize(device)
        result.load_seconds = time.perf_counter() - start
        # Over 300 tokens each: encode_prompt truncates to 300, so every mask is full.
        prompts = [" ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(400)) for i in range(setting.t5_prompts)]
        encoder.encode(prompts[: setting.t5_batch])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for i in range(0, len(prompts), setting.t5_batch):
            _, mask = encoder.encode(prompts[i : i + setting.t5_batch])
        synchronize(device)
        result.seconds = time.perf_counter() - start
        result.prompts = len(prompts)
        if int(mask.sum(dim=1).min()) != TOKENS:
            raise RuntimeError(f"prompts came out shorter than {TOKENS} tokens ({int(mask.sum(dim=1).min())})")
        if device.type == "cuda":
            result.peak_allocated = torch.cuda.max_memory_allocated(device) / GIB
        log(f"[t5] {result.prompts / result.seconds:.1f} prompts/s")
    finally:
        encoder.close()
