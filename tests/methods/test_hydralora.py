"""HydraLoRA: one A shared by every head, N routed B heads (dense softmax by default), identity at init, parameter
count, routing decisions, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
import deltatune.methods.hydralora  # noqa: F401
from deltatune import DeltatuneError

from test_multilora import attached, layer_info, randomize


def test_output_is_the_router_weighted_sum_of_heads_over_one_shared_a():
    model, delta, host, x = attached("hydralora", r=3, alpha=6, num_heads=4)
    randomize(delta)
    assert tuple(delta.lora_A.shape) == (3, 24) and tuple(delta.lora_B.shape) == (4, 20, 3)
    with torch.no_grad():
        y0 = F.linear(x, model[0].weight, model[0].bias)
        weights = torch.softmax(x @ delta.router.t(), dim=-1)  # (5, 4): every head, the paper's dense mixture
        shared = x @ delta.lora_A.t()  # the one down-projection all heads read
        heads = torch.stack([shared @ delta.lora_B[i].t() for i in range(4)], dim=-2)  # (5, 4, 20)
        expected = y0 + 2.0 * (weights.unsqueeze(-1) * heads).sum(-2)
        torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(delta.last_routing.weights, weights)


def test_one_dominant_head_is_a_plain_lora_with_that_head():
    model, delta, host, _ = attached("hydralora", r=2, num_heads=3, top_k=1)
    randomize(delta)
    x = torch.rand(4, 24) + 0.1
    with torch.no_grad():
        delta.router.zero_()
        delta.router[1].fill_(2.0)
        y0 = F.linear(x, model[0].weight, model[0].bias)
        lora = y0 + delta.scaling * x @ delta.lora_A.t() @ delta.lora_B[1].t()
        torch.testing.assert_close(model(x), lora)
    assert (delta.last_routing.indices == 1).all()


def test_identity_at_init_and_parameter_count():
    model, delta, host, x = attached("hydralora", r=2, num_heads=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight, model[0].bias), atol=0, rtol=0)
    cls = deltatune.get_method("hydralora").delta
    count = cls.num_parameters(deltatune.config("hydralora", r=8, num_heads=3), layer_info(), "layer")
    assert count == 8 * 576 + 3 * 8 * 576 + 3 * 576  # one A, three B heads, the router


@pytest.mark.parametrize("fields,field", [({"num_heads": 0}, "num_heads"), ({"num_heads": 2, "top_k": 3}, "top_k"),
                                          ({"dropout": 1.0}, "dropout")])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("hydralora", **fields)
