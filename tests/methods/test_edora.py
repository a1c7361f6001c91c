"""EDoRA: DoRA's magnitude with frozen SVD factors and a trainable r × r core R: r² + out parameters."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.methods import edora  # noqa: F401

from test_hira import attached, layer_count, linear
from toys import make, run


def test_factors_are_the_truncated_svd_and_stay_frozen():
    model, delta, _ = linear("edora", out=12, inp=16, r=3, seed=None)
    w0 = model[0].weight.detach()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    torch.testing.assert_close(delta.lora_B @ delta.lora_A, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(delta.lora_B.t() @ delta.lora_B, torch.eye(3), atol=1e-5, rtol=0)
    trainable = {id(p) for p in deltatune.trainable_parameters(model)}
    assert trainable == {id(delta.lora_R), id(delta.magnitude)}
    frozen = (delta.lora_A.detach().clone(), delta.lora_B.detach().clone())
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    assert delta.lora_R.abs().sum() > 0  # R starts at 0 but learns
    assert torch.equal(delta.lora_A, frozen[0]) and torch.equal(delta.lora_B, frozen[1])


@pytest.mark.parametrize("toy,path", [("mlp", "lin0"), ("conv", "conv2d"), ("emb", "emb"),
                                      ("gpt2", "transformer.h.0.attn.c_attn")])
def test_merged_weight_is_magnitude_times_normalised_direction(toy, path):
    model, x = make(toy)
    module, delta, _ = attached(model, path, "edora", r=2, alpha=4)
    info = delta.info
    direction = to_matrix(info, module.weight.detach().clone())
    direction = direction + delta.scaling * delta.lora_B @ delta.lora_R @ delta.lora_A
    adapted = run(model, x)
    deltatune.merge(model)
    merged = to_matrix(info, module.weight.detach())
    expected = (delta.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_gaussian_core_init():
    _, delta, _ = linear("edora", r=4, init_std=1e-3, seed=None)
    assert 0 < delta.lora_R.abs().max() < 1e-2


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("edora", r=8) == 8 * 8 + 576  # vs DoRA's 8 · 1152 + 576


def test_bad_init_std_names_the_field():
    with pytest.raises(DeltatuneError, match="edora: init_std must be >= 0"):
        deltatune.config("edora", init_std=-1.0)
