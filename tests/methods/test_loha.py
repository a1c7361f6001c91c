"""LoHa: Hadamard structure of ΔW, rank beyond r, parameter count, PEFT parity (Linear, Conv, CP convs).

Also holds the small helpers the other structured-method tests import.
"""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.loha  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import HostInfo
from peft_roundtrip import deltatune_saved_loads_in_peft, from_peft_kwargs, peft, peft_saved_loads_in_deltatune
from toys import make, run

LAYER_576 = HostInfo("linear", 576, 576, (), (576, 576), True, -1)


def delta_of(model, path: str, name: str = "default"):
    return model.get_submodule(path).deltatune[name]


def test_delta_weight_is_the_hadamard_product_of_two_low_rank_matrices():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, alpha=6, targets=["lin1"], init="random"))
    d = delta_of(model, "lin1")
    expected = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b) * (6 / 2)
    torch.testing.assert_close(d.delta_weight(None), expected)
    assert torch.linalg.matrix_rank(expected.detach()) > 2  # Hadamard product of rank-2 factors: rank up to 4


def test_identity_at_init_and_only_w2_b_is_zero():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["lin0"]))
    d = delta_of(model, "lin0")
    assert torch.count_nonzero(d.hada_w2_b) == 0
    assert all(torch.count_nonzero(p) > 0 for n, p in d.named_parameters() if n != "hada_w2_b")
    assert torch.count_nonzero(d.delta_weight(None)) == 0


def test_cp_conv_factor_matches_the_written_out_contraction():
    model, _ = make("conv")
    cfg = deltatune.config("loha", r=2, targets=["conv2d"], use_effective_conv2d=True, init="random")
    deltatune.attach(model, cfg)
    d = delta_of(model, "conv2d")
    first = torch.einsum("ijkl,ip,jq->pqkl", d.hada_t1, d.hada_w1_a, d.hada_w1_b)
    second = torch.einsum("ijkl,ip,jq->pqkl", d.hada_t2, d.hada_w2_a, d.hada_w2_b)
    torch.testing.assert_close(d.delta_weight(None), first * second * d.scaling)


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("loha")  # r = 8: two rank-8 pairs, 2·r·(576 + 576)
    count = deltatune.get_method("loha").delta.num_parameters(cfg, LAYER_576, "x")
    assert count == 2 * 8 * (576 + 576) == 18432


@pytest.mark.parametrize("field,value", [("r", 0), ("rank_dropout", 1.0), ("module_dropout", -0.1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("loha", **{field: value})


def test_rank_dropout_only_while_training():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["lin1"], init="random", rank_dropout=0.5))
    model.eval()  # new deltas start in training mode whatever the model's mode
    adapted = run(model, x)
    torch.testing.assert_close(run(model, x), adapted)  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), adapted)


PEFT_CASES = [
    ("llama", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("conv", {"r": 2, "alpha": 3, "target_modules": ["conv2d", "conv1d", "head"]}),
    ("conv", {"r": 2, "alpha": 3, "target_modules": ["conv2d", "conv1d", "head"],
              "use_effective_conv2d": True}),
    ("llama", {"r": 2, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 3},
               "alpha_pattern": {"q_proj": 5}}),
]


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_peft_parity_both_ways(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.LoHaConfig(init_weights=False, **kwargs), toy, tmp_path)
    deltatune_saved_loads_in_peft(from_peft_kwargs("loha", kwargs), toy, tmp_path)
