"""AdapterBias: y + (x·w_α + b_α)·v on the feed-forward output layer, i.e. the rank-1 ΔW = v·w_αᵀ with Δb = b_α·v;
placement, the shared-α variant, parameter count, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import delta_at
from toys import make, perturb, run

import deltatune
import deltatune.methods.adapterbias
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of


def test_update_is_a_token_dependent_shift_along_v():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("adapterbias", targets=["lin1"]))
    perturb(model, "default", seed=0)
    delta = delta_at(model, "lin1")
    h = model.norm(torch.relu(model.lin0(x)))
    with torch.no_grad():
        with deltatune.use(model, None):
            y = model.lin1(h)
        alpha = h @ delta.alpha.weight.t() + delta.alpha.bias  # (batch, 1): one scalar per token
        torch.testing.assert_close(model.lin1(h), y + alpha * delta.vector)
    weight = delta.delta_weight(None)
    assert torch.linalg.matrix_rank(weight) == 1
    torch.testing.assert_close(weight, torch.outer(delta.vector, delta.alpha.weight[0]))


def test_starts_as_identity_and_merges():
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("adapterbias"))
    assert sorted(p for p, _, _ in slots_of(model)) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(run(model, x), base)
    perturb(model, "default", seed=0)
    adapted = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=2e-5, rtol=1e-4)


def test_shared_alpha_is_one_layer_for_all_and_counts_once():
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("adapterbias", share_alpha=True))
    paths = [p for p, _, _ in slots_of(model)]
    assert paths == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    first, second = (delta_at(model, p) for p in paths)
    assert first.shared is second.shared and first.alpha is None
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 2 * 16 + 64 + 1


def test_parameter_count_for_a_576_wide_ffn():
    from deltatune.core.hosts import HostInfo

    info = HostInfo("linear", 1536, 576, (), (576, 1536), False, -1)
    spec = deltatune.get_method("adapterbias")
    assert spec.delta.num_parameters(deltatune.config("adapterbias"), info, "down_proj") == 1536 + 1 + 576


def test_shared_alpha_over_layers_of_different_widths_is_refused():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="share_alpha needs one input width"):
        deltatune.attach(model, deltatune.config("adapterbias", share_alpha=True, targets=["lin0", "lin1"]))
    assert not slots_of(model)
    with pytest.raises(DeltatuneError, match="share_alpha must be bool"):
        deltatune.config("adapterbias", share_alpha="yes")
