"""SVFT: ΔW = U M Vᵀ with M sparse on a plain / banded / random pattern."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.catalog import REFERENCE_LAYER
from deltatune.methods.svft import SvftConfig, svft_pattern
from test_spectral import linear_host


def dense_m(delta) -> torch.Tensor:
    m = torch.zeros(delta.n, delta.n)
    return m.index_put((delta.rows, delta.cols), delta.m.detach(), accumulate=True)


@pytest.mark.parametrize("fields", [{"pattern": "plain"}, {"d": 2}, {"pattern": "random", "d": 1, "r": 5}])
def test_update_is_u_m_vt_inside_the_singular_span(fields):
    model, delta, x = linear_host("svft", **fields)
    update = delta.delta_weight(None)
    torch.testing.assert_close(update, delta.u @ dense_m(delta) @ delta.vh, atol=1e-5, rtol=1e-5)
    u, v = delta.u, delta.vh.t()
    torch.testing.assert_close(update - u @ u.t() @ update @ v @ v.t(), torch.zeros_like(update), atol=1e-5, rtol=0)
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base + x @ update.t(), atol=1e-5, rtol=1e-5)


def test_patterns():
    rows, cols = svft_pattern(SvftConfig(pattern="plain"), 6, "a")
    assert torch.equal(rows, torch.arange(6)) and torch.equal(cols, torch.arange(6))
    rows, cols = svft_pattern(SvftConfig(d=2), 6, "a")
    band = {(i, j) for i in range(6) for j in range(6) if abs(i - j) <= 2}
    assert set(zip(rows.tolist(), cols.tolist())) == band and rows.numel() == len(band) == 6 * 5 - 2 * 3
    random = SvftConfig(pattern="random", d=2, seed=1)
    first = svft_pattern(random, 6, "layers.0.q")
    assert all(torch.equal(a, b) for a, b in zip(first, svft_pattern(random, 6, "layers.0.q")))
    assert not torch.equal(first[0], svft_pattern(random, 6, "layers.1.q")[0])  # layers differ
    assert not torch.equal(first[0], svft_pattern(random.replace(seed=2), 6, "layers.0.q")[0])
    assert first[0].numel() == 6 * 5 - 2 * 3


def test_identity_at_init_and_m_trains():
    model, delta, x = linear_host("svft")
    with torch.no_grad():
        delta.m.zero_()
    assert torch.count_nonzero(delta.delta_weight(None)) == 0
    model(x).pow(2).sum().backward()
    assert delta.m.grad is not None and delta.m.grad.abs().sum() > 0


@pytest.mark.parametrize("fields,count", [
    ({"pattern": "plain"}, 576),
    ({}, 576 * 5 - 2 * 3),  # banded, d = 2: n(2d+1) − d(d+1)
    ({"pattern": "random"}, 576 * 5 - 2 * 3),
    ({"d": 4, "r": 64}, 64 * 9 - 4 * 5),
])
def test_parameter_count_on_a_576x576_layer(fields, count):
    spec = deltatune.get_method("svft")
    assert spec.delta.num_parameters(spec.config(**fields), REFERENCE_LAYER, "layer") == count
    assert spec.delta(spec.config(**fields), REFERENCE_LAYER, "layer").m.numel() == count


def test_bad_input_names_the_field():
    with pytest.raises(deltatune.DeltatuneError, match="d .*must be >= 0"):
        deltatune.config("svft", d=-1)
    with pytest.raises(deltatune.DeltatuneError, match="pattern"):
        deltatune.config("svft", pattern="top_k")
