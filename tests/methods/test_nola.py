"""NOLA: A and B are linear combinations of frozen random bases regenerated from the seed (never saved); only the
k + l coefficients train, whatever the layer's shape; identity at init; bad values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.nola  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import HostInfo

from test_vera import LAYER_576, delta_of, shared_of
from toys import make, perturb, save_and_reload

FIELDS = {"r": 3, "num_bases_a": 5, "num_bases_b": 7, "alpha": 6.0}


def test_a_and_b_are_linear_combinations_of_the_shared_bases():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("nola", targets=["lin0", "lin1"], **FIELDS))
    perturb(model, "default", seed=0)
    bases = shared_of(model)
    assert tuple(bases.bases_A.shape) == (5, 3, 20) and tuple(bases.bases_B.shape) == (7, 20, 3)
    d = delta_of(model, "lin0")  # 10 -> 20
    a = sum(d.nola_alpha[i] * bases.bases_A[i, :, :10] for i in range(5)) / math.sqrt(10)
    b = sum(d.nola_beta[j] * bases.bases_B[j, :20, :] for j in range(7)) / math.sqrt(3)
    dw = d.delta_weight(None)
    torch.testing.assert_close(dw, (6.0 / 3) * b @ a)
    assert torch.linalg.matrix_rank(dw.detach()) <= 3


def test_bases_regenerate_from_the_seed_and_are_not_saved(tmp_path):
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("nola", seed=4, targets=["c_attn", "c_proj"], **FIELDS))
    perturb(model, "default", seed=0)
    keys, fresh = save_and_reload(model, "gpt2", tmp_path)
    assert keys and all(k.endswith(("nola_alpha", "nola_beta")) for k in keys)
    assert torch.equal(shared_of(fresh).bases_A, shared_of(model).bases_A)
    other, _ = make("gpt2")
    deltatune.attach(other, deltatune.config("nola", seed=5, targets=["c_attn", "c_proj"], **FIELDS))
    assert not torch.equal(shared_of(other).bases_A, shared_of(model).bases_A)


def test_identity_at_init_beta_zero_alpha_scaled_like_lora():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64))
    deltatune.attach(model, deltatune.config("nola", r=16, num_bases_a=1024, num_bases_b=8, targets=["0"]))
    d = delta_of(model, "0")
    assert torch.count_nonzero(d.nola_beta) == 0 and torch.count_nonzero(d.delta_weight(None)) == 0
    assert d.nola_alpha.std().item() == pytest.approx(1 / 32, rel=0.1)  # N(0, 1/k)
    a, _ = d.factors(None)
    assert a.var().item() == pytest.approx(1 / (3 * 512), rel=0.1)  # LoRA's Kaiming-uniform variance


@pytest.mark.parametrize("info", [LAYER_576, HostInfo("conv2d", 3, 64, (3, 3), (64, 3, 3, 3), True, 1)])
def test_parameter_count_is_k_plus_l_whatever_the_layer(info):
    cfg = deltatune.config("nola", num_bases_a=100, num_bases_b=60)
    assert deltatune.get_method("nola").delta.num_parameters(cfg, info, "x") == 160


@pytest.mark.parametrize("field,value", [("num_bases_a", 0), ("num_bases_b", -2), ("r", 0), ("seed", -1),
                                         ("dropout", 1.0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("nola", **{field: value})
