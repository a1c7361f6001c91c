"""HRA: a chain of r Householder reflections (orthogonal, rank-r update), paired init is the identity,
Gram–Schmidt variant, the orthogonality regulariser, parameter count, bad configs, PEFT parity."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.hra  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.hra import HraDelta, orthogonality_penalty
from test_oft import (LAYER_576, attach_linear, deltatune_saved_loads_in_peft, peft,
                      peft_saved_loads_in_deltatune)


def _linear_hra(**fields):
    return attach_linear("hra", 12, 10, **fields)


def _householder_chain(u: torch.Tensor) -> torch.Tensor:
    out = torch.eye(u.shape[0])
    for v in u.t():
        out = out @ (torch.eye(u.shape[0]) - 2 * torch.outer(v, v) / v.dot(v))
    return out


def test_update_is_a_chain_of_reflections_orthogonal_and_of_rank_r():
    model, delta, host = _linear_hra(r=3, init="random")
    u = delta.hra_u.detach()
    chain = _householder_chain(u)
    torch.testing.assert_close(delta.reflection().detach(), chain, atol=1e-6, rtol=0)
    torch.testing.assert_close(chain.t() @ chain, torch.eye(12), atol=1e-5, rtol=0)
    weight = model[0].weight.detach()
    dw = delta.delta_weight(host).detach()
    torch.testing.assert_close(dw, weight @ chain - weight, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(dw).item() == 3
    merged = weight + dw  # neurons keep their norms and angles
    torch.testing.assert_close(merged @ merged.t(), weight @ weight.t(), atol=1e-5, rtol=0)


def test_symmetric_init_pairs_the_reflections_into_the_identity():
    _, delta, host = _linear_hra(r=4)
    u = delta.hra_u.detach()
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])
    assert delta.delta_weight(host).abs().max() < 1e-6


def test_gram_schmidt_variant_reflects_across_the_orthonormalised_span():
    _, delta, host = _linear_hra(r=3, apply_gs=True, init="random")
    basis, _ = torch.linalg.qr(delta.hra_u.detach())
    torch.testing.assert_close(delta.reflection().detach(), torch.eye(12) - 2 * basis @ basis.t(), atol=1e-6, rtol=0)
    # the same as chaining the reflections of the orthonormalised vectors
    torch.testing.assert_close(delta.reflection().detach(), _householder_chain(basis), atol=1e-5, rtol=0)


def test_orthogonality_penalty_is_the_papers_regulariser():
    model, delta, _ = _linear_hra(r=2, init="random")
    units = delta.hra_u.detach() / delta.hra_u.detach().norm(dim=0)
    expected = ((units.t() @ units - torch.eye(2)) ** 2).sum()
    torch.testing.assert_close(orthogonality_penalty(model), expected)
    with torch.no_grad():
        delta.hra_u.copy_(torch.eye(12)[:, :2] * 3.0)
    assert orthogonality_penalty(model).item() == pytest.approx(0.0, abs=1e-12)
    orthogonality_penalty(model).backward()  # differentiable: it is added to the loss
    with pytest.raises(DeltatuneError, match="no HRA adapter named 'other'"):
        orthogonality_penalty(model, "other")


def test_parameter_count_matches_the_paper():
    assert HraDelta.num_parameters(deltatune.config("hra", r=8), LAYER_576, "l") == 8 * 576  # r vectors of size d


@pytest.mark.parametrize("fields,match", [({"r": 0}, "r must be > 0"), ({"r": 3}, "even r"),
                                          ({"apply_gs": True}, "apply_gs")])
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(DeltatuneError, match=match):
        deltatune.config("hra", **fields)


PEFT_TOYS = {"llama": ["q_proj", "v_proj", "down_proj"], "conv": ["conv2d", "head"]}
CASES = [pytest.param(gs, toy, id=f"{'gs' if gs else 'chain'}-{toy}") for gs in (False, True) for toy in PEFT_TOYS]


@pytest.mark.parametrize("gs,toy", CASES)
def test_peft_saved_hra_loads_with_peft_logits(gs, toy, tmp_path):
    cfg = peft.HRAConfig(r=3, apply_GS=gs, target_modules=PEFT_TOYS[toy], init_weights=False)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path)


@pytest.mark.parametrize("gs,toy", CASES)
def test_deltatune_saved_hra_loads_in_peft(gs, toy, tmp_path):
    fields = {"targets": PEFT_TOYS[toy], "r": 3, "apply_gs": gs, "init": "random"}
    deltatune_saved_loads_in_peft(deltatune.config("hra", **fields), toy, tmp_path)
