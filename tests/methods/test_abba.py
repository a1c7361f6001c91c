"""ABBA: ΔW = s·(B1A1) ⊙ (B2A2), rank up to r1·r2 through the Khatri-Rao identity; SVD init of the first pair."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.methods.abba import khatri_rao_factors

from test_hira import layer_count, linear


def test_update_is_a_scaled_hadamard_product_of_two_low_rank_matrices():
    model, delta, host = linear("abba", out=20, inp=20, r1=2, r2=3, alpha=3.0, init="random")
    assert delta.scaling == pytest.approx(3.0**2 / math.sqrt(2 * 3))
    first, second = delta.abba_B1 @ delta.abba_A1, delta.abba_B2 @ delta.abba_A2
    update = delta.delta_weight(host)
    torch.testing.assert_close(update, delta.scaling * first * second)
    assert torch.linalg.matrix_rank(update).item() == 2 * 3  # r1·r2, beyond LoRA's r1 + r2 at equal parameters
    x = torch.randn(4, 20)
    torch.testing.assert_close(model(x), x @ (model[0].weight + update).t() + model[0].bias, atol=1e-5, rtol=1e-5)


def test_khatri_rao_factors_reproduce_the_hadamard_product():
    a1, b1, a2, b2 = torch.randn(2, 9), torch.randn(7, 2), torch.randn(4, 9), torch.randn(7, 4)
    down, up = khatri_rao_factors(a1, b1, a2, b2)
    assert down.shape == (8, 9) and up.shape == (7, 8)
    torch.testing.assert_close(up @ down, (b1 @ a1) * (b2 @ a2))


def test_default_init_is_truncated_svd_of_w_and_zero_second_pair():
    model, delta, host = linear("abba", out=12, inp=16, r1=3, r2=2, seed=None)
    u, s, vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    torch.testing.assert_close(delta.abba_B1 @ delta.abba_A1, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5,
                               rtol=1e-5)
    assert delta.abba_B2.abs().sum() == 0 and delta.abba_A2.abs().sum() > 0
    assert delta.delta_weight(host).abs().sum() == 0


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("abba", r1=4, r2=4) == (4 + 4) * (576 + 576)


def test_bad_ranks_name_the_field():
    with pytest.raises(DeltatuneError, match="abba: r1 and r2 must be > 0"):
        deltatune.config("abba", r1=0)
    with pytest.raises(DeltatuneError, match=r"abba: r1=4 exceeds min\(out_features, fan_in\)=3 at '0'"):
        linear("abba", out=3, inp=8, r1=4, r2=1)
