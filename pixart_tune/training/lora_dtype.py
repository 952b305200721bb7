"""The LoRA branch computed in the base model's dtype, its weights kept in fp32.

PEFT's ``lora.Linear.forward`` casts the layer input to the LoRA weights' dtype
(fp32) before ``lora_B(lora_A(x))``: on a bf16 base that is an fp32 copy of every
LoRA input, kept for backward, and fp32 matmuls. ``lora_compute_dtype: base``
instead runs the two small matmuls in the base dtype:

* the layer stops casting its input (PEFT's ``cast_input_dtype_enabled``), so
  ``lora_A`` keeps the bf16 input the base layer already has for backward;
* ``lora_A`` and ``lora_B`` cast their fp32 weights to the base dtype inside each
  forward (rank x width: small) and multiply in it.

The trainable parameters, their gradients and the optimizer state stay fp32: the
cast is part of the autograd graph, so each weight's gradient arrives in fp32 (it
was computed in bf16: about 3 significant digits, what the base's own activation
gradients carry). The branch's output was rounded to the base dtype before this
mode too (PEFT casts the layer result back), so the forward differs only by the
rounding of the rank-r intermediate.

Plain LoRA only: DoRA, LoKr and LoHa keep PEFT's own forward (the recipe check
refuses them with this mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

LORA_COMPUTE_DTYPES = ("fp32", "base")


class _BaseDtypeLinear(torch.nn.Linear):
    """An fp32 ``nn.Linear`` whose product runs in ``compute_dtype`` (set on the instance)."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias)


def set_lora_compute_dtype(transformer: torch.nn.Module, dtype: torch.dtype) -> int:
    """Makes every plain LoRA layer of ``transformer`` compute its branch in ``dtype``; returns how many.

    The LoRA weights are not touched (they stay fp32, as do their names in a state dict).
    """
    count = 0
    for layer in transformer.modules():
        if not isinstance(layer, LoraLayer) or not isinstance(layer.base_layer, torch.nn.Linear):
            continue
        if any(layer.use_dora.values()):
            raise ValueError("lora_compute_dtype=base supports plain LoRA only, not DoRA")
        layer.cast_input_dtype_enabled = False
        for module in (*layer.lora_A.values(), *layer.lora_B.values()):
            if type(module) not in (torch.nn.Linear, _BaseDtypeLinear):
                raise ValueError(f"lora_compute_dtype=base cannot run a {type(module).__name__} LoRA factor")
            module.__class__ = _BaseDtypeLinear
            module.compute_dtype = dtype
        count += 1
    return count
