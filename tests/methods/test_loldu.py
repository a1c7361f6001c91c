"""LoLDU: P·L·D·U reproduces W with L / U unit-triangular; L and U are frozen, recomputed from W and not saved; only
the diagonal (and scale) train; identity at init; ΔW formula; parameter count."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.loldu  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.loldu import ldu

from test_multilora import attached, layer_info
from toys import make, perturb, save_and_reload


@pytest.mark.parametrize("shape", [(12, 12), (20, 9), (7, 15)])
def test_ldu_reproduces_the_weight_with_unit_triangular_factors(shape):
    weight = torch.randn(*shape, dtype=torch.float64)
    perm_lower, pivots, upper = ldu(weight)
    torch.testing.assert_close(perm_lower @ torch.diag(pivots) @ upper, weight)
    k = min(shape)
    perm, lower, _ = torch.linalg.lu(weight)
    torch.testing.assert_close(perm_lower, perm @ lower)
    torch.testing.assert_close(torch.diagonal(lower), torch.ones(k, dtype=weight.dtype))
    torch.testing.assert_close(torch.diagonal(upper), torch.ones(k, dtype=weight.dtype))
    assert torch.equal(torch.tril(upper[:, :k], -1), torch.zeros(k, k, dtype=weight.dtype))


def test_full_rank_ldu_part_equals_the_weight_and_the_update_starts_at_zero():
    model, delta, host, x = attached("loldu", shape=(10, 10), r=10, alpha=2.0)
    weight = model[0].weight.detach()
    torch.testing.assert_close(delta.lower @ torch.diag(delta.z0) @ delta.upper, weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.z.detach(), delta.z0)  # z starts at the pivots, σ at alpha / r
    assert delta.sigma.item() == pytest.approx(0.2)
    assert delta.delta_weight(host).abs().max() == 0


def test_update_scales_the_ldu_components():
    model, delta, host, x = attached("loldu", r=4, alpha=4.0)
    with torch.no_grad():
        delta.z.mul_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        delta.sigma.fill_(1.3)
    coeff = 1.3 * delta.z - 1.0 * delta.z0
    expected = delta.lower @ torch.diag(coeff) @ delta.upper
    torch.testing.assert_close(delta.delta_weight(host), expected)
    torch.testing.assert_close(model(x), x @ (model[0].weight + expected).t() + model[0].bias)


def test_only_the_diagonal_and_scale_train_and_l_u_stay_frozen():
    model, delta, host, x = attached("loldu", r=3)
    assert {n for n, _ in delta.named_parameters()} == {"z", "sigma"}
    lower, upper = delta.lower.clone(), delta.upper.clone()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    assert torch.equal(delta.lower, lower) and torch.equal(delta.upper, upper)
    assert delta.delta_weight(host).abs().max() > 0
    _, frozen_scale, _, _ = attached("loldu", r=3, train_scale=False)
    assert {n for n, _ in frozen_scale.named_parameters()} == {"z"}


def test_file_holds_the_diagonal_only_and_l_u_are_recomputed_on_load(tmp_path):
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("loldu", r=3, targets=["q_proj", "down_proj"]))
    perturb(model, "default", 0)
    keys, _ = save_and_reload(model, "llama", tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"z", "sigma"}


def test_parameter_count_is_r_plus_one():
    cls = deltatune.get_method("loldu").delta
    assert cls.num_parameters(deltatune.config("loldu", r=16), layer_info(), "layer") == 17
    assert cls.num_parameters(deltatune.config("loldu", r=16, train_scale=False), layer_info(), "layer") == 16


def test_rank_above_the_smaller_side_is_refused():
    with pytest.raises(DeltatuneError, match="rank 30 exceeds 20"):
        attached("loldu", r=30)
    with pytest.raises(DeltatuneError, match="r must be > 0"):
        deltatune.config("loldu", r=0)
