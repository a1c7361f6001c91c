"""BoRA: magnitudes on both dimensions: the merged columns have norms m_in, after DoRA's row step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.methods import bora  # noqa: F401

from test_hira import attached, layer_count
from toys import make, run


@pytest.mark.parametrize("toy,path", [("mlp", "lin0"), ("conv", "conv2d"), ("emb", "emb"),
                                      ("gpt2", "transformer.h.0.attn.c_attn")])
def test_merged_weight_has_both_magnitudes(toy, path):
    model, x = make(toy)
    module, delta, _ = attached(model, path, "bora", r=2, init="random")
    info = delta.info
    w0 = to_matrix(info, module.weight.detach().clone())
    direction = w0 + delta.lora_B.reshape(info.out_features, -1) @ delta.lora_A.reshape(2, -1) * delta.scaling
    rows = (delta.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction  # DoRA's step
    # The perturbed magnitudes may be negative (a flipped channel): norms are |m|, directions carry sign(m).
    torch.testing.assert_close(rows.norm(dim=1), delta.magnitude.detach().abs(), atol=1e-5, rtol=1e-5)
    adapted = run(model, x)
    deltatune.merge(model)
    merged = to_matrix(info, module.weight.detach())
    torch.testing.assert_close(merged.norm(dim=0), delta.magnitude_in.detach().abs(), atol=1e-5, rtol=1e-5)
    cos = F.cosine_similarity(merged, rows, dim=0)  # every column is the row-normalised column, rescaled
    torch.testing.assert_close(cos, torch.sign(delta.magnitude_in.detach()), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_magnitudes_start_at_the_base_weight_norms():
    model, _ = make("mlp")
    module, delta, host = attached(model, "lin1", "bora", seed=None)
    w0 = module.weight.detach()
    torch.testing.assert_close(delta.magnitude.detach(), w0.norm(dim=1))
    torch.testing.assert_close(delta.magnitude_in.detach(), w0.norm(dim=0))
    assert delta.delta_weight(host).abs().max() < 1e-6


def test_norms_are_constants_in_backward():
    """With detached norms, m_in's gradient is (output grad)·(W₁x scaled per column)/‖W₁‖_col, summed."""
    model, _ = make("mlp")
    module, delta, _ = attached(model, "lin1", "bora", r=2, init="random")
    x = torch.randn(3, 20)
    module(x).sum().backward()
    v = module.weight.detach() + delta.lora_B.detach() @ delta.lora_A.detach() * delta.scaling
    rows = (delta.magnitude.detach() / v.norm(dim=1)).unsqueeze(1) * v
    expected = ((rows / rows.norm(dim=0)) * x.sum(0)).sum(0)
    torch.testing.assert_close(delta.magnitude_in.grad, expected, atol=1e-5, rtol=1e-5)


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("bora", r=8) == 8 * (576 + 576) + 576 + 576  # LoRA's, m_out and m_in


def test_lora_bias_is_refused():
    with pytest.raises(DeltatuneError, match="bora: lora_bias=True is not supported"):
        deltatune.config("bora", lora_bias=True)
