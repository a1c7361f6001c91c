"""Hydra: a parallel LoRA on the input plus a sequential LoRA on the pre-trained output (bias included), merged as
ΔW = s·(B_p·A_p + B_s·A_s·W₀), Δb = s·B_s·A_s·b₀; each branch alone; identity at init; parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
import deltatune.methods.hydra  # noqa: F401
from deltatune import DeltatuneError

from test_multilora import attached, layer_info, randomize


def test_forward_is_parallel_branch_plus_sequential_branch_on_the_pretrained_output():
    model, delta, host, x = attached("hydra", r=2, scale=0.5)
    randomize(delta)
    w0, b0 = model[0].weight.detach(), model[0].bias.detach()
    pretrained = F.linear(x, w0, b0)
    parallel = x @ delta.parallel_A.t() @ delta.parallel_B.t()
    sequential = pretrained @ delta.sequential_A.t() @ delta.sequential_B.t()
    torch.testing.assert_close(model(x), pretrained + 0.5 * (parallel + sequential))


def test_merged_weight_and_bias_follow_the_reparameterisation():
    model, delta, host, x = attached("hydra", r=3, scale=2.0)
    randomize(delta)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    seq = delta.sequential_B @ delta.sequential_A
    expected_w = w0 + 2.0 * (delta.parallel_B @ delta.parallel_A + seq @ w0)
    expected_b = b0 + 2.0 * seq @ b0
    with torch.no_grad():
        adapted = model(x)
        deltatune.merge(model)
        torch.testing.assert_close(model[0].weight, expected_w)
        torch.testing.assert_close(model[0].bias, expected_b)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_sequential_branch_alone_recombines_pretrained_features():
    _, delta, host, _ = attached("hydra", shape=(30, 12), r=2)
    randomize(delta)
    with torch.no_grad():
        delta.parallel_B.zero_()
    dw, w0 = delta.delta_weight(host), host.weight().detach()
    mix = delta.sequential_B @ delta.sequential_A
    torch.testing.assert_close(dw, mix @ w0)  # ΔW = C·W₀: each output row is a mix of W₀'s rows
    assert torch.linalg.matrix_rank(dw).item() <= 2


def test_identity_at_init_and_parameter_count():
    _, delta, host, _ = attached("hydra", r=2)
    assert delta.delta_weight(host).abs().max() == 0 and delta.delta_bias(host).abs().max() == 0
    cls = deltatune.get_method("hydra").delta
    assert cls.num_parameters(deltatune.config("hydra", r=8), layer_info(), "layer") == 8 * (576 + 3 * 576)


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="hydra: r must be > 0"):
        deltatune.config("hydra", r=0)
