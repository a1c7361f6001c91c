"""NoRA: the frozen outer pair is W's top-r SVD (its product is the best rank-r approximation), the trainable inner
pair is nested between them (ΔW's column / row spaces stay inside the outer ones, rank ≤ r'), outer factors are saved
and frozen, identity at init, parameter count."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.nora  # noqa: F401
from deltatune import DeltatuneError

from test_multilora import attached, layer_info, randomize
from toys import make, perturb, save_and_reload


def test_outer_pair_is_the_best_rank_r_approximation_of_w():
    model, delta, host, _ = attached("nora", r=4, inner_r=2)
    u, s, vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(delta.outer_B @ delta.outer_A, best, atol=1e-5, rtol=1e-5)
    assert delta.delta_weight(host).abs().max() == 0  # inner B = 0


def test_inner_pair_is_nested_between_the_outer_factors():
    model, delta, host, x = attached("nora", r=5, inner_r=2, alpha=4.0)
    randomize(delta)
    expected = 2.0 * delta.outer_B @ delta.inner_B @ delta.inner_A @ delta.outer_A
    dw = delta.delta_weight(host)
    torch.testing.assert_close(dw, expected)
    assert torch.linalg.matrix_rank(dw).item() == 2
    u, _, vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    left, right = u[:, :5], vh[:5]
    torch.testing.assert_close(left @ (left.t() @ dw), dw, atol=1e-5, rtol=1e-5)  # columns in span(U_r)
    torch.testing.assert_close((dw @ right.t()) @ right, dw, atol=1e-5, rtol=1e-5)  # rows in span(V_r)
    torch.testing.assert_close(model(x), x @ (model[0].weight + dw).t() + model[0].bias)


def test_only_the_inner_pair_trains_and_the_outer_pair_is_saved(tmp_path):
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("nora", r=3, inner_r=1, targets=["c_attn"]))
    names = {n.rsplit(".", 1)[-1] for n, _ in deltatune.named_trainable_parameters(model)}
    assert names == {"inner_A", "inner_B"}
    perturb(model, "default", 0)
    keys, _ = save_and_reload(model, "gpt2", tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"inner_A", "inner_B", "outer_A", "outer_B"}


def test_parameter_count_is_two_r_r_prime():
    cls = deltatune.get_method("nora").delta
    assert cls.num_parameters(deltatune.config("nora", r=16, inner_r=4), layer_info(), "layer") == 2 * 16 * 4


def test_inner_rank_above_outer_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="0 < inner_r <= r"):
        deltatune.config("nora", r=4, inner_r=8)
