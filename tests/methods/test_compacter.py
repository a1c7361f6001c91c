"""Compacter / Compacter++: projections are Σᵢ Aᵢ ⊗ sᵢtᵢᵀ with the rule matrices Aᵢ shared by every layer; placement,
identity at init, parameter count, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import delta_at, module_host_contract
from toys import make, perturb, run

import deltatune
import deltatune.methods.compacter
from deltatune import DeltatuneError
from deltatune.core.hosts import HostInfo
from deltatune.core.slot import slots_of


def test_projections_are_sums_of_kronecker_products_with_shared_rules():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("compacter", r=4, n=2))
    perturb(model, "default", seed=0)
    deltas = [s["default"] for _, _, s in slots_of(model)]
    assert len(deltas) == 4 and all(d.shared is deltas[0].shared for d in deltas)
    rule = deltas[0].shared.rule
    delta = deltas[1]
    down, _, up, _ = delta.projections()
    expected_down = sum(torch.kron(rule[i], torch.outer(delta.down_left[i], delta.down_right[i])) for i in range(2))
    expected_up = sum(torch.kron(rule[i], torch.outer(delta.up_left[i], delta.up_right[i])) for i in range(2))
    torch.testing.assert_close(down, expected_down)
    torch.testing.assert_close(up, expected_up)
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("shared.rule")) == 8  # stored once


def test_widths_that_n_does_not_divide_are_cropped():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("compacter", r=3, n=2, targets=["lin2"]))  # width 3, bottleneck 3
    down, _, up, _ = delta_at(model, "lin2").projections()
    assert down.shape == (3, 3) and up.shape == (3, 3)
    run(model, x)


def test_compacter_pp_sits_after_the_feed_forward_block_only_and_starts_as_identity():
    model, x = make("gpt2")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("compacter_pp", r=4, n=4))
    assert sorted(p for p, _, _ in slots_of(model)) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)


def test_parameter_count_for_a_576_wide_layer():
    info = HostInfo("linear", 1536, 576, (), (576, 1536), False, -1)
    config = deltatune.config("compacter", n=4)  # r = 576 // 32 = 18
    spec = deltatune.get_method("compacter")
    assert spec.delta.num_parameters(config, info, "down_proj") == 4 * (5 + 144) + 18 + 4 * (144 + 5) + 576
    assert spec.delta.num_shared_parameters(config, {"down_proj": info}) == 64


def test_on_blocks_keeps_the_contract(tmp_path):
    module_host_contract("compacter", {"r": 4, "n": 2}, "llama", ["model.layers.0.mlp", "model.layers.1.mlp"],
                         tmp_path)


def test_bad_n_is_one_clear_error():
    with pytest.raises(DeltatuneError, match="n must be > 0"):
        deltatune.config("compacter", n=0)
