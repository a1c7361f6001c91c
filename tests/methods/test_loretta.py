"""LoRETTA_rep: the tensor-train cores reproduce A and B, ΔW = s·B·A, identity at init, parameter count."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.loretta  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.loretta import tt_modes

from test_loha import LAYER_576, delta_of
from toys import make, perturb


def test_cores_reproduce_both_factors_and_the_update():
    model, _ = make("llama")
    cfg = deltatune.config("loretta", r=4, alpha=8, tt_rank=3, mode_size=8, targets=["down_proj"])
    deltatune.attach(model, cfg)
    perturb(model, "default", seed=0)
    d = delta_of(model, "model.layers.0.mlp.down_proj")  # (16, 32)
    # A (4, 32): modes [4] + [8, 4] -> three cores; written out as one einsum over the TT ranks.
    a0, a1, a2 = d.a_cores
    assert [tuple(c.shape) for c in d.a_cores] == [(1, 4, 3), (3, 8, 3), (3, 4, 1)]
    down = torch.einsum("xia,ajb,bky->ijk", a0, a1, a2).reshape(4, 32)
    b0, b1, b2 = d.b_cores  # B (16, 4): modes [8, 2] + [4]
    up = torch.einsum("xia,ajb,bky->ijk", b0, b1, b2).reshape(16, 4)
    torch.testing.assert_close(d.tt_factors()[0], down)
    torch.testing.assert_close(d.tt_factors()[1], up)
    torch.testing.assert_close(d.delta_weight(None), up @ down * 2.0)


def test_identity_at_init_unless_gaussian():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("loretta", r=2, targets=["lin1"]))
    assert torch.count_nonzero(delta_of(model, "lin1").delta_weight(None)) == 0
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("loretta", r=2, targets=["lin1"], init="gaussian"))
    assert torch.count_nonzero(delta_of(model, "lin1").delta_weight(None)) > 0


def test_modes_and_parameter_count_on_a_576_layer():
    assert tt_modes(576, 8) == [8, 8, 9] and tt_modes(30, 8) == [6, 5] and tt_modes(7, 8) == [7]
    # r = 8, TT rank 5: A over modes [8, 8, 8, 9] and B over [8, 8, 9, 8], ranks 1-5-5-5-1.
    expected = (8 * 5 + 5 * 8 * 5 + 5 * 8 * 5 + 5 * 9) + (8 * 5 + 5 * 8 * 5 + 5 * 9 * 5 + 5 * 8)
    cfg = deltatune.config("loretta")
    assert deltatune.get_method("loretta").delta.num_parameters(cfg, LAYER_576, "x") == expected == 990
    assert expected * 9 < 8 * (576 + 576)  # about a tenth of LoRA at the same rank


@pytest.mark.parametrize("field,value", [("tt_rank", 0), ("r", -1), ("mode_size", 1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("loretta", **{field: value})
