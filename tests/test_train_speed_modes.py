"""The trainer's speed and memory modes change no result: bf16 LoRA compute, compiled blocks,
selective checkpointing and fused AdamW, each against the plain path on a tiny model."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from pixart_tune.adapters.lora import LoraSettings, inject_lora, trainable_parameters
from pixart_tune.config import ConfigError
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.tiny import tiny_transformer_config
from pixart_tune.training.config import OptimSection, TrainConfig, load_train_config
from pixart_tune.training.lora_dtype import set_lora_compute_dtype
from pixart_tune.training.memory import plan_memory
from pixart_tune.training.optim import build_optimizer
from pixart_tune.training.speed import checkpointed_blocks, compile_blocks, enable_checkpointing
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (a fixture)

LAYERS = 4
# bf16 keeps 8 bits of mantissa. Measured on this tiny model (4 blocks, rank 4, bf16 base)
# against the same model all in fp32: the bf16 base with PEFT's fp32 LoRA branch is off
# by 0.74% of the gradient norm (4.2% worst entry relative to its tensor's largest),
# the bf16 LoRA branch by 0.79% (5.4%); the two bf16-base paths differ by 0.30% (2.1%)
# in gradients and 0.013% in loss. So the bf16 branch adds a small part to the error
# the bf16 base already makes: these bounds hold that with room for other CPUs.
LOSS_RTOL = 1e-3
GRAD_NORM_RTOL = 1e-2
GRAD_WORST_RTOL = 5e-2
EXTRA_ERROR = 1.25
"""At most this times the gradient error (against all-fp32) of the fp32 LoRA branch on the same bf16 base."""

def tiny_lora_transformer(dtype: torch.dtype = torch.float32, layers: int = LAYERS) -> PixArtTransformer2DModel:
    """A random tiny PixArt-Sigma with a rank-4 LoRA whose B is not zero (so every LoRA weight has a gradient)."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**tiny_transformer_config(layers=layers)).to(dtype)
    inject_lora(transformer, LoraSettings(rank=4, alpha=4, targets="attention_ff"))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return transformer.train()


def tiny_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 4, 16, 16, generator=generator).to(dtype),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=generator).to(dtype),
        encoder_attention_mask=torch.ones(2, 12, dtype=torch.long),
        timestep=torch.tensor([10, 700]),
    )


def loss_and_grads(transformer: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (noise half of the output against a fixed target) and the LoRA gradients, in fp32."""
    inputs = tiny_inputs(dtype)
    output = transformer(**inputs, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    target = torch.randn(output[:, :4].shape, generator=torch.Generator().manual_seed(2))
    loss = torch.nn.functional.mse_loss(output[:, :4].float(), target)
    transformer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def worst_relative_gap(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of a gradient relative to that gradient's largest entry, over all weights."""
    assert expected.keys() == actual.keys()
    return max(float((actual[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def norm_gap(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """|actual - expected| / |expected| over all LoRA gradients as one vector."""
    flat = lambda grads: torch.cat([grads[k].flatten() for k in expected])  # noqa: E731
    return float((flat(actual) - flat(expected)).norm() / flat(expected).norm())


# --- selective gradient checkpointing ----------------------------------------------


@pytest.mark.parametrize(
    "setting, expected", [(True, [0, 1, 2, 3]), (False, []), (1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (9, [0])]
)
def test_checkpointing_setting_names_the_blocks(setting, expected):
    assert checkpointed_blocks(setting, LAYERS) == expected


def test_checkpointing_setting_loads_from_a_recipe():
    assert load_train_config(None, ["gradient_checkpointing=2"]).gradient_checkpointing == 2
    assert load_train_config(None, ["gradient_checkpointing=true"]).gradient_checkpointing is True
    assert load_train_config(None, ["gradient_checkpointing=false"]).gradient_checkpointing is False
    with pytest.raises((ValueError, ConfigError), match="gradient_checkpointing"):
        load_train_config(None, ["gradient_checkpointing=0"])
    with pytest.raises((ValueError, ConfigError), match="gradient_checkpointing"):
        load_train_config(None, ["gradient_checkpointing=some"])


@pytest.mark.parametrize("setting", [True, 2, 3])
def test_checkpointing_every_kth_block_changes_no_value_and_recomputes_only_those(setting):
    reference = tiny_lora_transformer()
    expected_loss, expected_grads = loss_and_grads(reference, torch.float32)

    transformer = tiny_lora_transformer()
    chosen = enable_checkpointing(transformer, setting)
    calls = [0] * LAYERS
    for index, block in enumerate(transformer.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: calls.__setitem__(i, calls[i] + 1))
    loss, grads = loss_and_grads(transformer, torch.float32)

    assert chosen == checkpointed_blocks(setting, LAYERS)
    # A checkpointed block runs twice (forward, then its recomputation in backward).
    assert calls == [2 if i in chosen else 1 for i in range(LAYERS)]
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grads[k], expected_grads[k]) for k in expected_grads)


def test_plan_counts_the_checkpointed_blocks():
    def activations(setting) -> float:
        plan = plan_memory(TrainConfig(dtype="bf16", gradient_checkpointing=setting), 512, transformer_config=XL2_TRANSFORMER_CONFIG)
        return next(size for name, size in plan.rows if name.startswith("activations"))

    every, half, quarter, none = activations(True), activations(2), activations(4), activations(False)
    assert every < half < quarter < none
    # 14 of 28 blocks keep everything with k=2, 21 with k=4.
    assert half == pytest.approx(every + (none - every) * 14 / 28, rel=0.05)
    assert quarter == pytest.approx(every + (none - every) * 21 / 28, rel=0.05)


# --- the LoRA branch in the base dtype ---------------------------------------------


def test_bf16_lora_compute_matches_fp32_compute_within_tolerance():
    _, exact_grads = loss_and_grads(tiny_lora_transformer(torch.float32), torch.float32)
    fp32_path = tiny_lora_transformer(torch.bfloat16)
    expected_loss, expected_grads = loss_and_grads(fp32_path, torch.bfloat16)

    base_path = tiny_lora_transformer(torch.bfloat16)
    assert set_lora_compute_dtype(base_path, torch.bfloat16) == LAYERS * 10  # 8 attention + 2 feed-forward layers a block
    loss, grads = loss_and_grads(base_path, torch.bfloat16)

    assert float((loss - expected_loss).abs() / expected_loss) < LOSS_RTOL
    assert norm_gap(expected_grads, grads) < GRAD_NORM_RTOL
    assert worst_relative_gap(expected_grads, grads) < GRAD_WORST_RTOL
    assert norm_gap(exact_grads, grads) < EXTRA_ERROR * norm_gap(exact_grads, expected_grads)
    # The trainable weights and their gradients stay fp32 ...
    params = trainable_parameters(base_path)
    assert params and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    # ... and so does the optimizer state after a step.
    optimizer = build_optimizer(params, OptimSection(name="adamw_fused", lr=1e-3), torch.device("cpu"))
    optimizer.step()
    states = [value for state in optimizer.state.values() for value in state.values() if value.numel() > 1]
    assert states and all(value.dtype == torch.float32 for value in states)
    assert all(p.dtype == torch.float32 for p in params)


def test_bf16_lora_compute_keeps_no_fp32_copies_for_backward():
    def saved_fp32_bytes(transformer) -> int:
        seen: dict[int, int] = {}

        def pack(tensor):
            if tensor.dtype == torch.float32 and not isinstance(tensor, torch.nn.Parameter):
                seen[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            transformer(**tiny_inputs(torch.bfloat16), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        return sum(seen.values())

    fp32_path, base_path = tiny_lora_transformer(torch.bfloat16), tiny_lora_transformer(torch.bfloat16)
    set_lora_compute_dtype(base_path, torch.bfloat16)
    # fp32 LoRA compute keeps an fp32 copy of every LoRA input (and the rank-r product);
    # what the base mode keeps in fp32 is what the plain model does (timestep embedding).
    assert saved_fp32_bytes(base_path) < 0.2 * saved_fp32_bytes(fp32_path)


def test_plan_sees_the_smaller_activations_of_bf16_lora_compute():
    def activations(mode: str) -> float:
        config = TrainConfig(dtype="bf16", lora_compute_dtype=mode, gradient_checkpointing=False)
        plan = plan_memory(config, 512, transformer_config=XL2_TRANSFORMER_CONFIG)
        return next(size for name, size in plan.rows if name.startswith("activations"))

    assert activations("base") < 0.85 * activations("fp32")


def test_bf16_lora_compute_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="plain LoRA"):
        load_train_config(None, ["lora_compute_dtype=base", "lora.dora=true"])
    with pytest.raises(ValueError, match="plain LoRA"):
        load_train_config(None, ["lora_compute_dtype=base", "lora.type=lokr"])
    with pytest.raises((ValueError, ConfigError), match="lora_compute_dtype"):
        load_train_config(None, ["lora_compute_dtype=bf16"])


# --- regional compilation -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compiled_blocks_match_eager_and_keep_parameter_names():
    eager = tiny_lora_transformer(layers=2)
    expected_loss, expected_grads = loss_and_grads(eager, torch.float32)

    compiled = tiny_lora_transformer(layers=2)
    names = [name for name, _ in compiled.named_parameters()]
    torch._dynamo.reset()
    assert compile_blocks(compiled, torch.device("cpu")) == 2
    loss, grads = loss_and_grads(compiled, torch.float32)

    assert [name for name, _ in compiled.named_parameters()] == names  # checkpoints and adapters unchanged
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert worst_relative_gap(expected_grads, grads) < 1e-4


def test_compile_is_refused_without_a_compiler(monkeypatch):
    from pixart_tune.errors import UserError

    monkeypatch.setattr("pixart_tune.training.speed.shutil.which", lambda name: None)
    with pytest.raises(UserError, match="C compiler"):
        compile_blocks(tiny_lora_transformer(layers=1), torch.device("cpu"))


# --- fused AdamW -----------------------------------------------------------------------


def test_fused_adamw_steps_and_resumes_exactly():
    settings = OptimSection(name="adamw_fused", lr=1e-2)
    grads = [torch.randn(16, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def run(weight, optimizer, steps):
        for grad in steps:
            weight.grad = grad.clone()
            optimizer.step()

    straight = torch.nn.Parameter(torch.ones(16, 16))
    optimizer = build_optimizer([straight], settings, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True
    run(straight, optimizer, grads)
    assert straight.detach().mean() != 1.0

    first = torch.nn.Parameter(torch.ones(16, 16))
    optimizer = build_optimizer([first], settings, torch.device("cpu"))
    run(first, optimizer, grads[:2])
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = torch.nn.Parameter(first.detach().clone())
    optimizer = build_optimizer([resumed], settings, torch.device("cpu"))
    optimizer.load_state_dict(saved)
    run(resumed, optimizer, grads[2:])
    assert torch.equal(resumed, straight)


# --- the trainer with every mode on -------------------------------------------------


def test_trainer_steps_in_every_speed_mode_like_the_plain_path(tiny_model, red_dataset, tmp_path):
    """bf16 base, LoRA in bf16, every block checkpointed, fused AdamW: the first losses
    match the plain path (fp32 LoRA branch, no checkpointing) and the weights and
    optimizer state stay fp32."""
    from pixart_tune.training.trainer import Trainer

    def first_losses(name: str, *overrides: str) -> tuple[list[float], Trainer]:
        config = tiny_config(tiny_model, red_dataset, tmp_path / name, "dtype=bf16", "optim.name=adamw_fused", *overrides)
        trainer = Trainer(config, progress=False)
        trainer.setup()
        try:
            losses = [float(trainer.train_step(trainer.next_batch())) for _ in range(3)]
        finally:
            trainer.cleanup()
        return losses, trainer

    plain, _ = first_losses("plain", "lora_compute_dtype=fp32", "gradient_checkpointing=false")
    fast, trainer = first_losses("fast", "lora_compute_dtype=base", "gradient_checkpointing=1")

    assert trainer.checkpointed_blocks == [0, 1]
    assert fast == pytest.approx(plain, rel=LOSS_RTOL)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    states = [value for state in trainer.optimizer.state.values() for value in state.values() if value.numel() > 1]
    assert states and all(value.dtype == torch.float32 for value in states)
