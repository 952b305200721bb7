"""Prodigy and schedule-free AdamW: they train, resume bit for bit, switch modes, and say what is missing."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from pixart_tune.errors import UserError
from pixart_tune.training.config import OptimSection
from pixart_tune.training.optim import (
    STATE_BYTES_PER_PARAM,
    build_lr_scheduler,
    build_optimizer,
    optimizer_advice,
    set_optimizer_mode,
)

CPU = torch.device("cpu")
SETTINGS = {
    "prodigy": OptimSection(name="prodigy", lr=1.0, weight_decay=1e-2, d_coef=1.0),
    "adamw_schedulefree": OptimSection(name="adamw_schedulefree", lr=0.1, weight_decay=1e-2),
}
NAMES = list(SETTINGS)
TARGET_A, TARGET_B = torch.linspace(-1, 1, 48).reshape(6, 8), torch.linspace(2, -2, 24).reshape(8, 3)


def lora_pair() -> list[torch.nn.Parameter]:
    """A LoRA-like pair: A random, B zero (Prodigy keeps a scalar p0 for an all-zero weight)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 8, generator=generator)), torch.nn.Parameter(torch.zeros(8, 3))]


def loss_of(params: list[torch.nn.Parameter]) -> torch.Tensor:
    a, b = params
    return ((a - TARGET_A) ** 2).sum() + ((b - TARGET_B) ** 2).sum()


def train(optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_reduces_a_quadratic(name):
    params = lora_pair()
    optimizer = build_optimizer(params, SETTINGS[name], CPU)
    before = loss_of(params).item()
    # Prodigy's step size starts at d0 = 1e-6 and grows: it needs some steps to get going.
    train(optimizer, params, 100)
    set_optimizer_mode(optimizer, False)  # the weights a validation would see
    assert loss_of(params).item() < 0.1 * before
    assert name in STATE_BYTES_PER_PARAM


def test_state_bytes_match_the_state_the_optimizers_keep():
    """Prodigy keeps 4 fp32 tensors of a non-zero weight's size, schedule-free 2."""
    for name in NAMES:
        weight = torch.nn.Parameter(torch.ones(32, 32))
        optimizer = build_optimizer([weight], SETTINGS[name], CPU)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        kept = sum(t.numel() * t.element_size() for t in optimizer.state[weight].values() if torch.is_tensor(t))
        assert kept == STATE_BYTES_PER_PARAM[name] * weight.numel(), name


@pytest.mark.parametrize("toggle", [False, True], ids=["plain", "eval-around-save"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_continues_bit_for_bit(name, toggle, tmp_path):
    """K steps, save, M steps == K steps, save, fresh optimizer on the saved weights, load, M steps."""
    settings, k, m = SETTINGS[name], 7, 5
    # The uninterrupted run; with toggle, eval mode around the save as the trainer does.
    params = lora_pair()
    optimizer = build_optimizer(params, settings, CPU)
    train(optimizer, params, k)
    if toggle:
        set_optimizer_mode(optimizer, False)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved_weights = [p.detach().clone() for p in params]
    if toggle:
        set_optimizer_mode(optimizer, True)
    train(optimizer, params, m)

    # The resumed run: fresh weights loaded from the save, a fresh optimizer, the
    # trainer's order (mode set after building, load, mode set again).
    resumed = lora_pair()
    with torch.no_grad():
        for p, w in zip(resumed, saved_weights):
            p.copy_(w)
    fresh = build_optimizer(resumed, settings, CPU)
    set_optimizer_mode(fresh, True)
    fresh.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))  # as checkpoint.py loads it
    set_optimizer_mode(fresh, True)
    train(fresh, resumed, m)

    for ours, theirs in zip(resumed, params):
        assert torch.equal(ours, theirs)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def accelerate_state():
    """accelerate keeps its state in class-level singletons: start and leave them clean."""
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "accelerate"])
def test_schedule_free_modes_switch_the_weights(wrapped, accelerate_state):
    params = lora_pair()
    optimizer = build_optimizer(params, SETTINGS["adamw_schedulefree"], CPU)
    if wrapped:
        from accelerate import Accelerator

        optimizer = Accelerator(cpu=True).prepare(optimizer)
    train(optimizer, params, 10)
    y = [p.detach().clone() for p in params]

    set_optimizer_mode(optimizer, False)
    x = [p.detach().clone() for p in params]
    assert not any(torch.equal(a, b) for a, b in zip(x, y))
    set_optimizer_mode(optimizer, False)  # again: nothing moves
    assert all(torch.equal(p, b) for p, b in zip(params, x))
    with pytest.raises(Exception, match="train mode"):
        optimizer.step()  # schedulefree refuses to step at the evaluation point

    set_optimizer_mode(optimizer, True)
    # Two lerps (x = lerp(y, z, 1 - 1/beta1), y = lerp(x, z, 1 - beta1)): y again to
    # float rounding. Bit for bit where it matters, on resume: see the test above.
    for p, b in zip(params, y):
        torch.testing.assert_close(p.detach(), b, rtol=1e-6, atol=1e-6)
    train(optimizer, params, 1)


def test_mode_switch_leaves_other_optimizers_alone(accelerate_state):
    from accelerate import Accelerator

    for name in ("prodigy", "adamw", "sgd"):
        params = lora_pair()
        optimizer = build_optimizer(params, OptimSection(name=name, lr=1e-2), CPU)
        train(optimizer, params, 2)
        before = [p.detach().clone() for p in params]
        set_optimizer_mode(optimizer, False)
        set_optimizer_mode(Accelerator(cpu=True).prepare(optimizer), False)
        assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize(("name", "module", "extra"), [("prodigy", "prodigyopt", "prodigy"), ("adamw_schedulefree", "schedulefree", "schedulefree")])
def test_missing_package_names_its_extra(name, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like
    with pytest.raises(UserError) as error:
        build_optimizer(lora_pair(), SETTINGS[name], CPU)
    message = str(error.value)
    assert f"pixart-tune[{extra}]" in message and module in message and "\n" not in message


def test_advice_lines():
    assert optimizer_advice(SETTINGS["prodigy"], "cosine") == []  # Prodigy's README recommends cosine
    assert optimizer_advice(SETTINGS["adamw_schedulefree"], "constant_with_warmup") == []
    assert optimizer_advice(OptimSection(name="adamw8bit"), "cosine") == []

    (line,) = optimizer_advice(OptimSection(name="prodigy", lr=1e-4), "constant")
    assert "optim.lr=0.0001" in line and "d_coef" in line
    (line,) = optimizer_advice(SETTINGS["adamw_schedulefree"], "cosine")
    assert "schedule.lr_scheduler=cosine" in line and "constant_with_warmup" in line


def test_advice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr("pixart_tune.training.optim._warned", set())
    with caplog.at_level(logging.WARNING, logger="pixart_tune.training.optim"):
        for _ in range(2):
            build_optimizer(lora_pair(), OptimSection(name="prodigy", lr=1e-4), CPU)
            optimizer = build_optimizer(lora_pair(), SETTINGS["adamw_schedulefree"], CPU)
            build_lr_scheduler(optimizer, "cosine", 10, 100)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("with prodigy" in m for m in messages) == 1
    assert sum("with adamw_schedulefree" in m for m in messages) == 1


def test_prodigy_prints_nothing(capsys):
    build_optimizer(lora_pair(), SETTINGS["prodigy"], CPU)
    assert capsys.readouterr().out == ""
