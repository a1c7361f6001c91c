"""SVF and SVFit (methods/spectral.py), and what every singular-basis method shares: a frozen, unsaved SVD basis."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltatune
import deltatune.methods.kasa  # noqa: F401  (registration happens at import)
import deltatune.methods.salt  # noqa: F401
import deltatune.methods.spectral_adapter  # noqa: F401
import deltatune.methods.svft  # noqa: F401
from deltatune.catalog import REFERENCE_LAYER
from deltatune.core.hosts import HostInfo
from deltatune.methods.spectral import base_svd

# method -> (small config fields, names of its frozen basis buffers)
FAMILY = {
    "svf": ({}, ("u", "sigma", "vh")),
    "svfit": ({"r": 3}, ("u", "sigma", "vh")),
    "svft": ({"d": 1}, ("u", "sigma", "vh", "rows", "cols")),
    "salt": ({"r": 2, "lora_r": 2}, ("u", "sigma", "vh")),
    "spectral_adapter": ({"r": 2}, ("u", "sigma", "vh")),
    "kasa": ({"r": 2}, ("minor_u", "minor_v")),
}


def linear_host(method: str, out: int = 12, inp: int = 8, **fields):
    """A one-Linear model with `method` attached and its parameters perturbed; returns (model, delta, x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inp, out))
    deltatune.attach(model, deltatune.config(method, targets=["0"], **fields))
    with torch.no_grad():
        for p in deltatune.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    return model, model[0].deltatune["default"], torch.randn(5, inp)


@pytest.mark.parametrize("method", sorted(FAMILY))
def test_singular_vectors_are_frozen_unsaved_and_recomputed_identically(method, tmp_path):
    fields, buffers = FAMILY[method]
    model, delta, x = linear_host(method, **fields)
    trainable = {id(p) for p in deltatune.trainable_parameters(model)}
    for name in buffers:
        frozen = getattr(delta, name)
        assert frozen.numel() and not frozen.requires_grad and id(frozen) not in trainable
        assert name not in dict(delta.named_parameters())
    model(x).pow(2).sum().backward()
    assert all(getattr(delta, name).grad is None for name in buffers)
    deltatune.save(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        saved = {k.rsplit(".", 1)[-1] for k in f.keys()}
    assert not saved & set(buffers), f"{method} saved its frozen basis"
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 12))
    deltatune.load(fresh, tmp_path / "a")
    for name in buffers:
        assert torch.equal(getattr(fresh[0].deltatune["default"], name), getattr(delta, name)), name
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_basis_reconstructs_the_weight_with_fixed_signs():
    weight = torch.randn(7, 5, dtype=torch.float64)
    info = HostInfo("linear", 5, 7, (), (7, 5), False, -1)
    u, sigma, vh = base_svd(info, weight, torch.float64)
    torch.testing.assert_close(u @ torch.diag(sigma) @ vh, weight)
    torch.testing.assert_close(u.t() @ u, torch.eye(5, dtype=torch.float64))
    pivots = u.abs().argmax(dim=0)
    assert (u[pivots, torch.arange(5)] > 0).all()
    u_again, _, vh_again = base_svd(info, weight, torch.float64)  # the same weight always gives the same basis
    assert torch.equal(u_again, u) and torch.equal(vh_again, vh)


def test_svf_scales_the_singular_values_by_z():
    model, delta, _ = linear_host("svf")
    weight = model[0].weight.detach()
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)  # U diag(σ z) Vᵀ does not depend on signs
    expected = u @ torch.diag(sigma * delta.z.detach()) @ vh
    torch.testing.assert_close(weight + delta.delta_weight(None), expected, atol=1e-5, rtol=1e-5)


def test_svf_with_z_one_is_the_identity():
    model, delta, x = linear_host("svf")
    with torch.no_grad():
        delta.z.fill_(1.0)
    assert torch.count_nonzero(delta.delta_weight(None)) == 0
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)


def test_svfit_trains_only_the_top_r_singular_values():
    model, delta, _ = linear_host("svfit", r=3)
    weight = model[0].weight.detach()
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    adapted = weight + delta.delta_weight(None)
    u_r, v_r = u[:, :3], vh[:3].t()
    update = delta.delta_weight(None)
    torch.testing.assert_close(update - u_r @ u_r.t() @ update, torch.zeros_like(update), atol=1e-5, rtol=0)
    torch.testing.assert_close(update - update @ v_r @ v_r.t(), torch.zeros_like(update), atol=1e-5, rtol=0)
    expected = u @ torch.diag(torch.cat([delta.singular_values.detach(), sigma[3:]])) @ vh
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)


def test_diagonal_methods_gather_mixed_batches():
    assert deltatune.get_method("svf").mixed_batch == "gathered"
    assert deltatune.get_method("svfit").mixed_batch == "gathered"


@pytest.mark.parametrize("method,fields,count", [("svf", {}, 576), ("svfit", {}, 576), ("svfit", {"r": 16}, 16)])
def test_parameter_count_on_a_576x576_layer(method, fields, count):
    spec = deltatune.get_method(method)
    assert spec.delta.num_parameters(spec.config(**fields), REFERENCE_LAYER, "layer") == count
    model = nn.Sequential(nn.Linear(576, 576))
    deltatune.attach(model, deltatune.config(method, targets=["0"], **fields))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == count


def test_bad_inputs_name_the_field():
    with pytest.raises(deltatune.DeltatuneError, match="r must be > 0"):
        deltatune.config("svfit", r=0)
    with pytest.raises(deltatune.DeltatuneError, match="rank 9 exceeds 8"):
        linear_host("svfit", r=9)
    with pytest.raises(deltatune.DeltatuneError, match="unknown field.*r"):
        deltatune.config("svf", r=4)
