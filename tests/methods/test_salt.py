"""SALT: scale and shift of the top singular values, and a LoRA inside the residual singular subspace."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.catalog import REFERENCE_LAYER
from test_spectral import linear_host


def test_update_in_the_singular_basis_is_block_diagonal():
    _, delta, _ = linear_host("salt", out=8, inp=8, r=3, lora_r=2)  # square: U and V are complete bases
    core = delta.u.t() @ delta.delta_matrix() @ delta.vh.t()  # ΔW in singular coordinates (k, k)
    top = (delta.scale - 1) * delta.sigma[:3] + delta.shift
    torch.testing.assert_close(core[:3, :3], torch.diag(top.detach()), atol=1e-5, rtol=0)
    torch.testing.assert_close(core[3:, 3:], (delta.lora_x @ delta.lora_y).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(core[:3, 3:], torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(core[3:, :3], torch.zeros(5, 3), atol=1e-5, rtol=0)


def test_adapted_top_singular_values_are_scaled_and_shifted():
    model, delta, _ = linear_host("salt", r=2, lora_r=1)
    with torch.no_grad():
        delta.lora_x.zero_()
        delta.scale.copy_(torch.tensor([1.5, 0.5]))
        delta.shift.copy_(torch.tensor([0.1, -0.05]))
    adapted = model[0].weight + delta.delta_weight(None)
    sigma = torch.linalg.svdvals(model[0].weight.detach())
    expected = torch.cat([torch.tensor([1.5, 0.5]) * sigma[:2] + torch.tensor([0.1, -0.05]), sigma[2:]])
    torch.testing.assert_close(torch.linalg.svdvals(adapted.detach()), expected.sort(descending=True).values,
                               atol=1e-5, rtol=1e-5)


def test_identity_at_init():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12))
    deltatune.attach(model, deltatune.config("salt", targets=["0"], r=2, lora_r=2))
    assert torch.count_nonzero(model[0].deltatune["default"].delta_weight(None)) == 0


def test_parameter_count_on_a_576x576_layer():
    spec = deltatune.get_method("salt")
    expected = 2 * 8 + 2 * (576 - 8) * 8  # scale and shift on r = 8 values, rank-8 LoRA on the other 568
    assert spec.delta.num_parameters(spec.config(), REFERENCE_LAYER, "layer") == expected == 9104
    assert sum(p.numel() for p in spec.delta(spec.config(), REFERENCE_LAYER, "layer").parameters()) == expected


def test_bad_input_names_the_field():
    with pytest.raises(deltatune.DeltatuneError, match="lora_r must be > 0"):
        deltatune.config("salt", lora_r=0)
