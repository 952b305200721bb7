"""The EMA of LoRA weights against its closed form, and its state round trip."""

from __future__ import annotations

import pytest
import torch

from pixart_tune.training.config import EmaSection
from pixart_tune.training.ema import LoraEma, closed_form, updates_at


def _run(settings: EmaSection, steps: int, seed: int = 0) -> tuple[LoraEma, list[torch.Tensor]]:
    """A parameter that takes a random walk; returns the EMA and the weight after every step (index 0: initial)."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
    ema = LoraEma([param], settings)
    history = [param.detach().clone()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            param.add_(torch.randn(3, 4, generator=generator))
        ema.step(step)
        history.append(param.detach().clone())
    return ema, history


@pytest.mark.parametrize(
    "settings",
    [EmaSection(enabled=True, decay=0.9), EmaSection(enabled=True, decay=0.5, start_step=3), EmaSection(enabled=True, decay=0.8, start_step=2, every=3)],
    ids=["every-step", "start-3", "start-2-every-3"],
)
def test_ema_equals_its_closed_form(settings):
    ema, history = _run(settings, steps=11)
    expected = closed_form(history, settings)
    torch.testing.assert_close(ema.shadow[0].double(), expected, rtol=1e-6, atol=1e-6)


def test_the_schedule_is_a_function_of_the_step():
    settings = EmaSection(enabled=True, start_step=2, every=3)
    assert [s for s in range(1, 12) if updates_at(s, settings)] == [5, 8, 11]


def test_applied_swaps_in_the_average_and_restores_the_weights_exactly():
    ema, history = _run(EmaSection(enabled=True, decay=0.9), steps=5)
    param = ema.params[0]
    with ema.applied():
        assert torch.equal(param.detach(), ema.shadow[0])
    assert torch.equal(param.detach(), history[-1])


def test_state_round_trip_resumes_bit_for_bit():
    settings = EmaSection(enabled=True, decay=0.95, start_step=1, every=2)
    whole, _ = _run(settings, steps=10)
    # The same run, stopped at step 6 and continued in a fresh EMA from the saved state.
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
    first = LoraEma([param], settings)
    for step in range(1, 7):
        with torch.no_grad():
            param.add_(torch.randn(3, 4, generator=generator))
        first.step(step)
    second = LoraEma([param], settings)
    second.load_state_dict(first.state_dict())
    for step in range(7, 11):
        with torch.no_grad():
            param.add_(torch.randn(3, 4, generator=generator))
        second.step(step)
    assert torch.equal(second.shadow[0], whole.shadow[0])


def test_a_state_of_other_shapes_is_refused():
    ema = LoraEma([torch.nn.Parameter(torch.zeros(2, 2))], EmaSection(enabled=True))
    with pytest.raises(ValueError, match="other shapes"):
        ema.load_state_dict({"shadow": [torch.zeros(3, 3)]})
