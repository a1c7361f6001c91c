"""Spectral Adapter (additive): W' = (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ + W_rest."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.catalog import REFERENCE_LAYER
from test_spectral import linear_host


def test_only_the_top_spectral_space_changes():
    model, delta, x = linear_host("spectral_adapter", r=2)
    weight = model[0].weight.detach()
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    rest = u[:, 2:] @ torch.diag(sigma[2:]) @ vh[2:]  # W_rest: sign-invariant, so an independent SVD will do
    top = weight + delta.delta_weight(None) - rest
    assert torch.linalg.matrix_rank(top.detach(), atol=1e-4) == 2
    tuned_u = (delta.u + delta.delta_u).detach()
    tuned_v = (delta.vh.t() + delta.delta_v).detach()
    torch.testing.assert_close(top.detach(), tuned_u @ torch.diag(delta.sigma) @ tuned_v.t(), atol=1e-5, rtol=1e-5)
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base + x @ delta.delta_weight(None).t(), atol=1e-5, rtol=1e-5)


def test_identity_at_init_and_both_offsets_train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12))
    deltatune.attach(model, deltatune.config("spectral_adapter", targets=["0"], r=2))
    delta = model[0].deltatune["default"]
    assert torch.count_nonzero(delta.delta_weight(None)) == 0
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert delta.delta_u.grad.abs().sum() > 0 and delta.delta_v.grad.abs().sum() > 0


def test_parameter_count_on_a_576x576_layer():
    spec = deltatune.get_method("spectral_adapter")
    assert spec.delta.num_parameters(spec.config(), REFERENCE_LAYER, "layer") == 4 * (576 + 576) == 4608
    assert sum(p.numel() for p in spec.delta(spec.config(), REFERENCE_LAYER, "layer").parameters()) == 4608


def test_bad_input_names_the_field():
    with pytest.raises(deltatune.DeltatuneError, match="r must be > 0"):
        deltatune.config("spectral_adapter", r=0)
