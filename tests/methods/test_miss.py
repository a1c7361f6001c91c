"""MiSS / Bone: ΔW repeats one shard across the input, Bone's block-affine form reads W, mini shards repeat
along the output; parameter count; PEFT parity for the three forms."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.miss  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host

from peft_roundtrip import deltatune_saved_loads_in_peft, from_peft_kwargs, peft, peft_saved_loads_in_deltatune
from test_loha import LAYER_576, delta_of
from toys import make, perturb

DOWN = "model.layers.0.mlp.down_proj"  # (16, 32)


def _attached(**fields):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("miss", targets=["down_proj"], **fields))
    perturb(model, "default", seed=0)
    return model, delta_of(model, DOWN)


def test_the_shard_repeats_across_the_input_and_is_cut_at_the_end():
    _, d = _attached(r=5)  # 32 inputs = 6 full shards of 5 and a last shard of 2
    weight = d.delta_weight(None).detach()
    shard = d.miss_block.detach().t()  # (out, r)
    for start in range(0, 32, 5):
        torch.testing.assert_close(weight[:, start : start + 5], shard[:, : min(5, 32 - start)])
    x = torch.randn(3, 32)  # the shard-sum forward equals the dense ΔW
    torch.testing.assert_close(d.shard_sums(x) @ d.miss_block, x @ weight.t(), atol=1e-5, rtol=1e-5)


def test_mini_shard_repeats_along_the_output_too():
    _, d = _attached(r=4, init="mini", mini_r=2)
    weight = d.delta_weight(None).detach()
    assert d.miss_block.shape == (4, 2)
    torch.testing.assert_close(weight, d.miss_block.detach().t().repeat(8, 8))


def test_bat_is_the_block_affine_map_of_the_base_weight():
    model, d = _attached(r=4, init="bat")
    w = model.get_submodule(DOWN).weight.detach()
    module = model.get_submodule(DOWN)
    weight = d.delta_weight(Host(module, module.deltatune)).detach()
    blocks = d.miss_block.detach()  # (out/r, r, r)
    for i in range(4):
        for j in range(8):
            w_ij = w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            block = weight[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            torch.testing.assert_close(block, w_ij @ blocks[i] + blocks[i])
    assert d.uses_base_weight and not delta_of(_attached(r=4)[0], DOWN).uses_base_weight


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("miss")  # r = 64: one shard (r, out)
    spec = deltatune.get_method("miss")
    assert spec.delta.num_parameters(cfg, LAYER_576, "x") == 64 * 576 == 36864
    assert spec.delta.num_parameters(cfg.replace(init="bat"), LAYER_576, "x") == 9 * 64 * 64  # (out/r)·r²


def test_bad_values_are_refused():
    with pytest.raises(DeltatuneError, match="r and mini_r must be > 0"):
        deltatune.config("miss", r=0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="r=11 exceeds the 10 inputs of 'lin0'"):
        deltatune.attach(model, deltatune.config("miss", r=11, targets=["lin0"]))
    with pytest.raises(DeltatuneError, match="init='bat' needs r=3"):
        deltatune.attach(model, deltatune.config("miss", r=3, init="bat", targets=["lin0"]))


PEFT_CASES = [
    {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 3, "target_modules": ["q_proj", "down_proj"]},  # 16 and 32 inputs: the last shard is cut
    {"r": 4, "target_modules": ["q_proj", "down_proj"], "init_weights": "bat"},
    {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": "mini", "mini_r": 2},
]


@pytest.mark.parametrize("kwargs", PEFT_CASES)
def test_peft_parity_both_ways(kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.MissConfig(**kwargs), "llama", tmp_path)
    deltatune_saved_loads_in_peft(from_peft_kwargs("miss", kwargs, {"init_weights": "init"}), "llama", tmp_path)
