"""LoTR: one L, R per group of same-shaped layers (Tucker-2), a core per layer, saved once; counts."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.core.api import shared_of
import deltatune.methods.lotr  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of
from deltatune.methods.lotr import LotrDelta

from test_loha import LAYER_576, delta_of
from toys import make, perturb, save_and_reload

Q0, Q1, V0 = (f"model.layers.{i}.self_attn.{n}_proj" for i, n in ((0, "q"), (1, "q"), (0, "v")))


def _lotr(**fields):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("lotr", targets=["q_proj", "v_proj", "o_proj"], r=2, **fields))
    perturb(model, "default", seed=0)
    return model, x


def test_same_shaped_layers_share_l_and_r_and_each_core_reproduces_its_delta():
    model, _ = _lotr(alpha=3.0)
    q0, q1, v0 = delta_of(model, Q0), delta_of(model, Q1), delta_of(model, V0)
    assert q0.group == q1.group == "16x16" and v0.group == "8x16"
    lhs, rhs = q0.shared_factors()
    assert lhs is q1.shared_factors()[0] and rhs is q1.shared_factors()[1] and lhs is not v0.shared_factors()[0]
    for d in (q0, q1):  # the Tucker-2 slices: ΔW_l = s·L·G_l·R
        torch.testing.assert_close(d.delta_weight(None), lhs @ d.lotr_core @ rhs * 1.5)
    assert not torch.allclose(q0.delta_weight(None), q1.delta_weight(None))


def test_share_by_name_separates_modules_of_one_shape():
    model, _ = _lotr(share_by="name")
    assert delta_of(model, Q0).group == "q_proj_16x16"
    assert delta_of(model, "model.layers.0.self_attn.o_proj").group == "o_proj_16x16"
    assert len(shared_of(model, "default").lhs) == 3


def test_shared_factors_train_once_and_are_saved_once(tmp_path):
    model, _ = _lotr()
    trainable = dict(deltatune.named_trainable_parameters(model))
    infos = {path: slot.info for path, _, slot in slots_of(model)}
    config = deltatune.adapters(model)["default"]
    formula = sum(LotrDelta.num_parameters(config, info, path) for path, info in infos.items())
    count = sum(p.numel() for p in trainable.values())
    assert count == formula + LotrDelta.num_shared_parameters(config, infos)
    assert count == 6 * 4 + 2 * (16 + 16) + 2 * (8 + 16)  # 6 cores, 2 groups
    keys, fresh = save_and_reload(model, "llama", tmp_path)
    assert sorted(k for k in keys if "shared" in k) == [f"base_model.model.deltatune_shared.{side}.{group}"
                                                        for side in ("lhs", "rhs") for group in ("16x16", "8x16")]
    assert delta_of(fresh, Q0).shared_factors()[0] is delta_of(fresh, Q1).shared_factors()[0]


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("lotr")  # r = 8: a core of 8² per layer, L and R of 8·576 each per group
    assert LotrDelta.num_parameters(cfg, LAYER_576, "x") == 64
    assert LotrDelta.num_shared_parameters(cfg, {"x": LAYER_576}) == 8 * (576 + 576) == 9216
    twelve = {f"layers.{i}.q": LAYER_576 for i in range(12)}  # 12 layers of one shape: the factors paid once
    assert LotrDelta.num_shared_parameters(cfg, twelve) == 9216


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="r must be > 0"):
        deltatune.config("lotr", r=0)
