"""MoS: low-rank factors assembled from shards of pools shared across layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune.core.api import shared_of
import deltatune.methods.mos  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host

from toys import make, perturb, run, save_and_reload


class Block(nn.Module):
    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width_in, width_out)


def _stack(layers=4, width_in=12, width_out=8, **fields):
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width_in, width_out) for _ in range(layers)])
    defaults = {"r": 4, "equivalent_rank": 2, "private_rank": 1, "shards_per_vector": 2}
    deltatune.attach(model, deltatune.config("mos", targets=["proj"], **{**defaults, **fields}))
    deltas = [model[i].proj.deltatune["default"] for i in range(layers)]
    return model, deltas, shared_of(model, "default")


def test_factors_are_shared_shards_then_private_shards_concatenated_per_rank_vector():
    model, deltas, shared = _stack(r=4, private_rank=1, shards_per_vector=2)
    with torch.no_grad():
        for p in [shared.pools["proj_8x12_B"], *[d.private_B for d in deltas]]:
            p.normal_()
    delta = deltas[2]
    pool_a, pool_b = shared.pools["proj_8x12_A"], shared.pools["proj_8x12_B"]
    a_shards = torch.cat([pool_a[delta.shard_index_A], delta.private_A])  # 4 rank vectors × 2 shards of length 6
    b_shards = torch.cat([pool_b[delta.shard_index_B], delta.private_B])  # 4 × 2 shards of length 4
    a = torch.stack([torch.cat([a_shards[2 * i], a_shards[2 * i + 1]]) for i in range(4)])
    b = torch.stack([torch.cat([b_shards[2 * i], b_shards[2 * i + 1]]) for i in range(4)], dim=1)
    host = Host(model[2].proj, model[2].proj.deltatune)
    torch.testing.assert_close(delta.delta_weight(host), (delta.config.alpha / 4) * b @ a)


def test_subset_selection_and_pair_dissociation():
    _, deltas, shared = _stack(layers=4, r=4, equivalent_rank=3, private_rank=1, shards_per_vector=2)
    size = shared.pools["proj_8x12_A"].shape[0]
    assert size == (3 - 1) * 4 * 2  # (e − p)·L·l shards per factor
    for d in deltas:
        for index in (d.shard_index_A, d.shard_index_B):
            assert index.numel() == (4 - 1) * 2 and len(set(index.tolist())) == index.numel()  # no repeats
            assert 0 <= int(index.min()) and int(index.max()) < size
    assert any(not torch.equal(d.shard_index_A, d.shard_index_B) for d in deltas)  # A and B drawn apart
    assert len({tuple(d.shard_index_A.tolist()) for d in deltas}) > 1  # each layer its own subset


def test_a_pool_shard_is_shared_by_every_layer_that_draws_it():
    model, deltas, shared = _stack(layers=4, r=4, equivalent_rank=2, private_rank=1)
    shard = int(deltas[0].shard_index_B[0])
    users = [i for i, d in enumerate(deltas) if shard in d.shard_index_B.tolist()]
    hosts = [Host(model[i].proj, model[i].proj.deltatune) for i in range(4)]
    with torch.no_grad():
        shared.pools["proj_8x12_B"][shard].fill_(1.0)
    changed = [i for i, d in enumerate(deltas) if d.delta_weight(hosts[i]).abs().sum() > 0]
    assert changed == users and 0 in users


def test_private_shards_belong_to_one_layer():
    model, deltas, _ = _stack(r=4, equivalent_rank=3, private_rank=2)
    with torch.no_grad():
        deltas[1].private_B.fill_(1.0)
    hosts = [Host(model[i].proj, model[i].proj.deltatune) for i in range(4)]
    assert [bool(d.delta_weight(h).abs().sum() > 0) for d, h in zip(deltas, hosts)] == [False, True, False, False]


def test_parameter_count_equals_lora_of_the_equivalent_rank():
    model = nn.Sequential(*[Block(576, 576) for _ in range(3)])
    deltatune.attach(model, deltatune.config("mos", r=4, equivalent_rank=2, private_rank=1, shards_per_vector=4,
                                             targets=["proj"]))
    actual = sum(p.numel() for p in deltatune.trainable_parameters(model))
    assert actual == 3 * 2 * (576 + 576)  # LoRA of rank e = 2 on three 576×576 layers
    info = model[0].proj.deltatune.info
    assert deltatune.get_method("mos").delta.num_parameters(deltatune.adapters(model)["default"], info, "0.proj") == 2304


def test_vector_sharding_cuts_shards_to_widths_l_does_not_divide():
    model, deltas, shared = _stack(layers=2, width_in=10, width_out=3, r=2, shards_per_vector=2)
    assert shared.pools["proj_3x10_A"].shape[1] == 5 and shared.pools["proj_3x10_B"].shape[1] == 2
    down, up = deltas[0].factors(None)
    assert down.shape == (2, 10) and up.shape == (3, 2)


def test_identity_at_init_and_the_pools_are_saved_once(tmp_path):
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("mos", r=2, equivalent_rank=2, private_rank=1,
                                             targets=["q_proj", "v_proj"]))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
    perturb(model, "default", 0)
    with torch.no_grad():
        shared_of(model, "default").pools["q_proj_16x16_B"].normal_()
    keys, _ = save_and_reload(model, "llama", tmp_path)
    assert sum(".pools." in k for k in keys) == 4  # two groups × (A, B)


def test_pool_too_small_for_the_draw_is_refused():
    with pytest.raises(DeltatuneError, match="raise equivalent_rank or lower r"):
        _stack(layers=1, r=4, equivalent_rank=2, private_rank=1)


@pytest.mark.parametrize("fields,field", [({"private_rank": 3}, "private_rank"), ({"shards_per_vector": 0},
                                          "shards_per_vector"), ({"equivalent_rank": 0}, "equivalent_rank")])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("mos", r=2, **fields)
