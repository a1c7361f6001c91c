"""MultiLoRA: ΔW is a sum of n parallel scaled LoRAs, identity at init through zero scalings while both factors are
random, its rank can exceed r, parameter count. Also the helpers the other low-rank-structure tests import."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.multilora  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import host_info
from deltatune.core.slot import Host


def attached(method: str, shape: tuple[int, int] = (24, 20), bias: bool = True, **fields):
    """A one-Linear model (in, out) with `method` attached: (model, delta, host, input)."""
    model = nn.Sequential(nn.Linear(*shape, bias=bias))
    deltatune.attach(model, deltatune.config(method, targets=["0"], **fields))
    module = model[0]
    return model, module.deltatune["default"], Host(module, module.deltatune), torch.randn(5, shape[0])


def layer_info(fan_in: int = 576, out: int = 576):
    return host_info(nn.Linear(fan_in, out), "layer")


def randomize(delta: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_update_is_a_sum_of_scaled_parallel_loras():
    model, delta, host, x = attached("multilora", r=2, n=3)
    randomize(delta)
    expected = sum(delta.scalings[i] * delta.lora_B[i] @ delta.lora_A[i] for i in range(3))
    torch.testing.assert_close(delta.delta_weight(host), expected)
    torch.testing.assert_close(model(x), x @ (model[0].weight + expected).t() + model[0].bias)
    assert torch.linalg.matrix_rank(expected).item() == 6  # n·r > r: the parallel modules add up


def test_identity_at_init_comes_from_zero_scalings_with_both_factors_random():
    model, delta, host, x = attached("multilora", r=4, n=2)
    assert delta.scalings.abs().sum() == 0
    assert delta.lora_B.abs().max() > 0  # unlike LoRA, B is not zero
    assert delta.lora_A.abs().max() <= 1 / 24**0.5 and delta.lora_B.abs().max() <= 1 / 4**0.5  # Kaiming bounds
    assert delta.delta_weight(host).abs().max() == 0
    model.train()
    model(x).pow(2).sum().backward()
    assert delta.scalings.grad.abs().max() > 0  # the scalings learn from the first step


def test_parameter_count_for_a_576_layer():
    cls = deltatune.get_method("multilora").delta
    config = deltatune.config("multilora", r=8, n=3)
    assert cls.num_parameters(config, layer_info(), "layer") == 3 * (8 * (576 + 576) + 1)


def test_bad_n_names_the_field():
    with pytest.raises(DeltatuneError, match="n must be > 0"):
        deltatune.config("multilora", n=0)
