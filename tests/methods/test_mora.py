"""MoRA: one square matrix M with parameter-free operators reaches a rank far above r at LoRA's parameter budget;
the materialised ΔW matches the operators (checked against applying them to the identity); the rotation operator's
diagonal blocks are M·R_b; the sharing operator's ΔW is periodic; identity at init; parameter count."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.mora  # noqa: F401
from deltatune import DeltatuneError

from test_multilora import attached, layer_info, randomize


@pytest.mark.parametrize("operator", ["rotation", "sharing"])
def test_rank_exceeds_r_at_the_same_parameter_budget_as_lora(operator):
    _, delta, host, _ = attached("mora", shape=(64, 64), r=4, operator=operator)
    randomize(delta)
    side = delta.M.shape[0]
    assert abs(side - (4 * (64 + 64)) ** 0.5) <= 1  # r̂² ≈ a rank-4 LoRA's 4·(64 + 64) parameters
    rank = torch.linalg.matrix_rank(delta.delta_weight(host)).item()
    assert rank > 4 and rank >= min(side, 64) - 1


@pytest.mark.parametrize("operator", ["rotation", "sharing"])
@pytest.mark.parametrize("shape", [(20, 10), (10, 20), (23, 7), (5, 40)])
def test_materialised_update_equals_the_operators_applied_to_the_identity(operator, shape):
    model, delta, host, x = attached("mora", shape=shape, r=1, operator=operator)
    randomize(delta)
    with torch.no_grad():
        by_identity = delta.operator(torch.eye(shape[0])).t()  # column j = operators applied to e_j
    torch.testing.assert_close(delta.delta_weight(host), by_identity)
    torch.testing.assert_close(model(x), x @ (model[0].weight + by_identity).t() + model[0].bias)


def test_rotation_blocks_are_m_times_rope_rotations():
    _, delta, host, _ = attached("mora", shape=(24, 24), r=1)  # r̂ = 6 (after rounding to even), 4 segments
    randomize(delta)
    side, dw, m = delta.side, delta.delta_weight(host), delta.M.detach()
    torch.testing.assert_close(dw[:side, :side], m)  # segment 0 has angle 0: R_0 = I
    rotation = torch.linalg.solve(m, dw[side:2 * side, side:2 * side])  # R_1 = M⁻¹·block
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(side), atol=1e-4, rtol=1e-4)
    assert dw[:side, side:].abs().max() == 0  # block diagonal


def test_sharing_update_repeats_with_period_r_hat():
    _, delta, host, _ = attached("mora", shape=(30, 30), r=1, operator="sharing")
    randomize(delta)
    side, dw = delta.side, delta.delta_weight(host)
    torch.testing.assert_close(dw[side:2 * side], dw[:side])  # decompress tiles M's output
    assert torch.linalg.matrix_rank(dw).item() <= side


def test_identity_at_init_and_parameter_count_for_a_576_layer():
    _, delta, host, _ = attached("mora", r=2)
    assert delta.delta_weight(host).abs().max() == 0
    cls = deltatune.get_method("mora").delta
    config = deltatune.config("mora", r=8)
    assert cls.num_parameters(config, layer_info(), "layer") == 96 * 96 == 8 * (576 + 576)


def test_bad_operator_names_the_field():
    with pytest.raises(DeltatuneError, match="mora.operator must be 'rotation' | 'sharing'"):
        deltatune.config("mora", operator="truncation")
