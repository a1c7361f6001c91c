"""SingLoRA: ΔW = s·u(t)·A·Aᵀ is symmetric on square layers, the truncation rule on non-square ones, the ramp u(t)
gives an exact identity start and advances with training forwards (saved with the adapter), parameter count."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
import deltatune.methods.singlora  # noqa: F401
from deltatune import DeltatuneError

from test_multilora import attached, layer_info, randomize


def test_square_update_is_symmetric_and_rank_r():
    _, delta, host, _ = attached("singlora", shape=(16, 16), r=3, alpha=6.0, ramp_steps=0)
    dw = delta.delta_weight(host)
    torch.testing.assert_close(dw, dw.t())
    torch.testing.assert_close(dw, (6.0 / 3) * delta.A @ delta.A.t())
    assert torch.linalg.matrix_rank(dw).item() == 3


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_non_square_update_uses_the_first_rows_of_a_for_the_smaller_side(shape):
    fan_in, out = shape
    model, delta, host, x = attached("singlora", shape=shape, r=2, alpha=2.0, ramp_steps=0)
    assert delta.A.shape == (max(shape), 2)
    expected = delta.A[:out] @ delta.A[:fan_in].t()
    torch.testing.assert_close(delta.delta_weight(host), expected)
    square = expected[: min(shape), : min(shape)]
    torch.testing.assert_close(square, square.t())  # the shared block stays symmetric
    torch.testing.assert_close(model(x), x @ (model[0].weight + expected).t() + model[0].bias)


def test_ramp_starts_at_identity_and_rises_linearly_with_training_forwards():
    model, delta, host, x = attached("singlora", r=2, alpha=2.0, ramp_steps=4)
    model.eval()
    base = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)  # u(0) = 0
    full = delta.A[:20] @ delta.A[:24].t()
    model.train()
    for step in range(1, 7):
        model(x).sum().backward()
        assert delta.ramp_step.item() == step
        torch.testing.assert_close(delta.delta_weight(host), min(step / 4, 1.0) * full)
    model.eval()
    with torch.no_grad():
        model(x)
    assert delta.ramp_step.item() == 6  # evaluation does not advance the ramp


def test_ramp_position_is_saved_and_restored(tmp_path):
    base = torch.nn.Sequential(torch.nn.Linear(12, 8))
    fresh = copy.deepcopy(base)
    deltatune.attach(base, deltatune.config("singlora", r=2, ramp_steps=10, targets=["0"]))
    delta = base[0].deltatune["default"]
    randomize(delta)
    delta.ramp_step.fill_(3)
    x = torch.randn(4, 12)
    base.eval()
    out = base(x)
    deltatune.save(base, tmp_path / "a")
    deltatune.load(fresh, tmp_path / "a")
    assert fresh[0].deltatune["default"].ramp_step.item() == 3
    torch.testing.assert_close(fresh(x), out)


def test_parameter_count_is_r_times_the_larger_side():
    cls = deltatune.get_method("singlora").delta
    config = deltatune.config("singlora", r=8)
    assert cls.num_parameters(config, layer_info(), "layer") == 8 * 576  # half of LoRA's 2·8·576
    assert cls.num_parameters(config, layer_info(576, 1536), "layer") == 8 * 1536


def test_negative_ramp_steps_names_the_field():
    with pytest.raises(DeltatuneError, match="ramp_steps must be >= 0"):
        deltatune.config("singlora", ramp_steps=-1)
