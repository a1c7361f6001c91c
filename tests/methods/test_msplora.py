"""MSPLoRA: ΔW_l = global + mid-level + layer-specific LoRA; the global pair is shared by every layer of a kind, a
mid-level pair by the layers of one group, the layer pair by nobody; identity at init; parameter counts."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.core.api import shared_of
import deltatune.methods.msplora  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host, slots_of

from test_denselora import llama_with, model_config
from test_multilora import layer_info, randomize
from toys import make, run


def q_deltas(model):
    modules = [layer.self_attn.q_proj for layer in model.model.layers]
    return [(m.deltatune["default"], Host(m, m.deltatune)) for m in modules]


@pytest.mark.parametrize("group_size,mid_shared", [(1, False), (2, True)])
def test_levels_are_shared_at_their_scale(group_size, mid_shared):
    model, _ = llama_with("msplora", r_global=4, r_mid=2, r_layer=1, mid_group_size=group_size)
    (d0, _), (d1, _) = q_deltas(model)
    levels = shared_of(model, "default")[d0.key]
    assert d0.key == d1.key and d0.shared is d1.shared
    assert (d0.mid == d1.mid) is mid_shared
    assert set(levels.keys()) == ({"global", "mid0"} if mid_shared else {"global", "mid0", "mid1"})
    assert d0.lora_A is not d1.lora_A


def test_update_is_the_sum_of_three_scaled_loras():
    model, _ = llama_with("msplora", r_global=4, r_mid=2, r_layer=1, mid_group_size=1, alpha=8.0)
    randomize(shared_of(model, "default"), seed=1)
    (d0, host0), (d1, host1) = q_deltas(model)
    randomize(d0, seed=2)
    levels = shared_of(model, "default")[d0.key]

    def lora(pair, r):
        return (8.0 / r) * pair.lora_B @ pair.lora_A

    expected0 = lora(levels["global"], 4) + lora(levels["mid0"], 2) + lora(d0, 1)
    torch.testing.assert_close(d0.delta_weight(host0), expected0)
    # layer 1 shares only the global component with layer 0 (its layer pair is still zero-initialised)
    torch.testing.assert_close(d1.delta_weight(host1), lora(levels["global"], 4) + lora(levels["mid1"], 2))


def test_identity_at_init_and_every_level_trains():
    model, x = llama_with("msplora", mid_group_size=1)
    base, _ = make("llama")
    torch.testing.assert_close(run(model, x), run(base, x), atol=0, rtol=0)
    model.train()
    model(x).logits.pow(2).mean().backward()
    levels = shared_of(model, "default")["q_proj_16x16"]
    (d0, _), _ = q_deltas(model)
    for b in (levels["global"].lora_B, levels["mid0"].lora_B, d0.lora_B):
        assert b.grad is not None and b.grad.abs().max() > 0


def test_parameter_counts_per_layer_and_shared():
    cls = deltatune.get_method("msplora").delta
    assert cls.num_parameters(deltatune.config("msplora", r_layer=2), layer_info(), "layer") == 2 * (576 + 576)
    model, _ = llama_with("msplora", r_global=4, r_mid=2, r_layer=1, mid_group_size=1)
    hosts = {path: slot.info for path, _, slot in slots_of(model)}
    config = model_config(model)
    shared = cls.num_shared_parameters(config, hosts)
    sides = (16 + 16) + (16 + 8) + (32 + 16)  # q_proj, v_proj, down_proj
    assert shared == (4 + 2 * 2) * sides  # one global and two mid-level pairs per kind
    total = shared + sum(cls.num_parameters(config, i, p) for p, i in hosts.items())
    assert total == sum(p.numel() for p in deltatune.trainable_parameters(model))


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="msplora: r_mid must be > 0"):
        deltatune.config("msplora", r_mid=0)
