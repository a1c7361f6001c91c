"""ETHER / ETHER+: block Householder reflections at the fixed distance ‖H_k − I‖_F = 2, the bounded two-sided
relaxation, identity at init for ETHER+ only, parameter counts independent of n, bad configs."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.ether  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.ether import EtherDelta, EtherPlusDelta
from test_oft import LAYER_576, attach_linear


def _linear(method: str, **fields):
    return attach_linear(method, 12, 8, **fields)


def _blocks(matrix: torch.Tensor, n: int) -> list[torch.Tensor]:
    size = matrix.shape[0] // n
    return [matrix[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(n)]


def test_ether_reflection_is_orthogonal_at_fixed_distance_whatever_the_vector():
    model, delta, host = _linear("ether", n_blocks=3)
    for step in range(3):
        h = delta.input_transform().detach()
        torch.testing.assert_close(h.t() @ h, torch.eye(12), atol=1e-5, rtol=0)
        assert torch.equal(h, torch.block_diag(*_blocks(h, 3)))
        for block in _blocks(h, 3):
            assert torch.linalg.matrix_norm(block - torch.eye(4)).item() == pytest.approx(2.0, abs=1e-5)
        assert torch.linalg.matrix_norm(h - torch.eye(12)).item() == pytest.approx(2 * 3**0.5, abs=1e-5)
        with torch.no_grad():
            delta.ether_u.mul_(5.0).add_(torch.randn_like(delta.ether_u))  # any step keeps the distance
    weight = model[0].weight.detach()
    h = delta.input_transform().detach()
    torch.testing.assert_close(delta.delta_weight(host), weight @ h - weight, atol=1e-6, rtol=0)
    merged = weight @ h
    torch.testing.assert_close(merged @ merged.t(), weight @ weight.t(), atol=1e-5, rtol=0)


def test_ether_is_not_the_identity_at_init_but_ether_plus_is():
    _, ether, host = _linear("ether")
    assert ether.delta_weight(host).abs().max() > 1e-3
    assert not EtherDelta.identity_at_init
    _, plus, host = _linear("ether_plus", n_blocks=2)
    assert plus.delta_weight(host).abs().max() < 1e-6


def test_ether_plus_is_bounded_two_sided_and_not_orthogonal():
    model, delta, host = _linear("ether_plus", n_blocks=2)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_()
    h_in = delta.input_transform().detach()
    for block in _blocks(h_in, 2):
        assert torch.linalg.matrix_norm(block - torch.eye(6)).item() <= 2**0.5 + 1e-6
    assert (h_in.t() @ h_in - torch.eye(12)).abs().max() > 1e-2
    u, v = (t.detach() / t.detach().norm(dim=1, keepdim=True) for t in (delta.ether_u_out, delta.ether_v_out))
    h_out = torch.block_diag(*[torch.eye(4) - torch.outer(a, a) + torch.outer(b, b) for a, b in zip(u, v)])
    weight = model[0].weight.detach()
    torch.testing.assert_close(delta.delta_weight(host), h_out @ weight @ h_in - weight, atol=1e-5, rtol=0)


def test_one_sided_ether_plus_touches_only_the_input_side():
    model, delta, host = _linear("ether_plus", two_sided=False)
    assert not hasattr(delta, "ether_u_out")
    with torch.no_grad():
        delta.ether_v.normal_()
    weight = model[0].weight.detach()
    torch.testing.assert_close(delta.delta_weight(host), weight @ delta.input_transform().detach() - weight)


def test_parameter_counts_do_not_depend_on_the_block_count():
    for n in (1, 4, 32):
        assert EtherDelta.num_parameters(deltatune.config("ether", n_blocks=n), LAYER_576, "l") == 576
        cfg = deltatune.config("ether_plus", n_blocks=n)
        assert EtherPlusDelta.num_parameters(cfg, LAYER_576, "l") == 4 * 576
        assert EtherPlusDelta.num_parameters(cfg.replace(two_sided=False), LAYER_576, "l") == 2 * 576


def test_bad_config_names_the_field():
    with pytest.raises(DeltatuneError, match="n_blocks must be > 0"):
        deltatune.config("ether", n_blocks=0)
    with pytest.raises(DeltatuneError, match="n_blocks=5 does not divide the 12 inputs"):
        _linear("ether", n_blocks=5)
    with pytest.raises(DeltatuneError, match="n_blocks=3 does not divide the 8 outputs"):
        _linear("ether_plus", n_blocks=3)
