"""Speed and memory modes of the transformer blocks: selective checkpointing and regional compilation.

* **Selective gradient checkpointing** (``gradient_checkpointing``): ``true``
  recomputes every block's activations in backward, ``false`` none, an integer k
  every k-th block (blocks 0, k, 2k, ...). Memory falls with each checkpointed
  block and so does speed: a budget with room to spare keeps the rest of the
  blocks' activations instead of recomputing them. Checkpointing changes no value:
  the recomputed forward is the same computation (tests/test_train_speed_modes.py).
* **Regional compilation** (``compile``): ``torch.compile`` of each transformer
  block, not of the whole model. The blocks are identical, so one compiled graph
  serves all of them and compiling takes seconds, not minutes; the eager code
  outside the blocks (embeddings, the head) is a handful of kernels. Each block is
  compiled in place (``nn.Module.compile``), so parameter names, and with them
  checkpoints and saved adapters, do not change.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Callable

import torch

from pixart_tune.errors import UserError

CheckpointSetting = bool | int
"""``true`` (every block), ``false`` (none) or k (every k-th block)."""


def checkpointed_blocks(setting: CheckpointSetting, num_layers: int) -> list[int]:
    """Indices of the blocks ``setting`` recomputes in backward, of ``num_layers``."""
    if setting is True:
        return list(range(num_layers))
    if setting is False:
        return []
    if setting < 1:
        raise ValueError(f"gradient_checkpointing must be true, false or a block interval k >= 1, got {setting}")
    return list(range(0, num_layers, setting))


def enable_checkpointing(transformer: torch.nn.Module, setting: CheckpointSetting) -> list[int]:
    """Turns on checkpointing of the blocks ``setting`` names; returns their indices.

    diffusers' PixArt forward sends every block through the model's checkpointing
    function once checkpointing is on; this one checkpoints the chosen blocks and
    calls the others directly.
    """
    blocks = transformer.transformer_blocks
    chosen = checkpointed_blocks(setting, len(blocks))
    if not chosen:
        transformer.disable_gradient_checkpointing()
        return chosen
    recompute = {id(blocks[i]) for i in chosen}

    def checkpoint(block: Callable, *args):
        if id(block) not in recompute:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(checkpoint)
    return chosen


def compile_unavailable(device: torch.device) -> str | None:
    """None when ``torch.compile`` can build kernels for ``device`` here, else the reason."""
    if device.type == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        return "torch.compile on the CPU needs a C compiler (cc or gcc) on PATH, and none was found"
    # triton (inductor's GPU code generator) comes with CUDA builds of torch, not as a
    # dependency of this project: looked up, not imported.
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a GPU needs triton, which is not installed"
    return None


def compile_blocks(transformer: torch.nn.Module, device: torch.device) -> int:
    """Compiles each transformer block in place; returns how many. Refuses where compile cannot run."""
    reason = compile_unavailable(device)
    if reason is not None:
        raise UserError(f"compile=true: {reason}; set compile=false")
    for block in transformer.transformer_blocks:
        block.compile()
    return len(transformer.transformer_blocks)
