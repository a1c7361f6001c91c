"""RandLoRA: a sum of n = ⌈m/r⌉ rank-r terms B_i·Λ_i·A·Γ_i over shared frozen random bases reaches full rank while
one term stays rank r; the bases are PEFT's draws from the seed; parameter count; PEFT parity (Linear, Conv1D)."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.randlora  # noqa: F401
from deltatune import DeltatuneError

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from test_vera import LAYER_576, PEFT_TARGETS, delta_of, needs_shared_keys_at_base_model, peft_and_ours, shared_of
from toys import make, perturb

SHARED = ("randlora_A", "randlora_B")


@pytest.mark.parametrize("path", ["lin0", "lin1"])  # 10 -> 20 (in < out) and 20 -> 20
def test_the_sum_reaches_full_rank_while_one_term_stays_rank_r(path):
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("randlora", r=3, targets=["lin0", "lin1"]))
    perturb(model, "default", seed=0)
    d = delta_of(model, path)
    m = min(d.info.out_features, d.info.fan_in)
    assert d.n == -(-m // 3) and torch.linalg.matrix_rank(d.delta_weight(None).detach()) == m > 3
    with torch.no_grad():
        d.randlora_lambda[:, 1:] = 0  # keep only the first basis pair
    assert torch.linalg.matrix_rank(d.delta_weight(None).detach()) <= 3


def test_a_wide_layer_uses_the_transposed_update():
    model, _ = make("llama")  # down_proj: 32 -> 16, so m = out = 16 and B_i spans the 32 inputs
    deltatune.attach(model, deltatune.config("randlora", r=4, targets=["down_proj"]))
    perturb(model, "default", seed=0)
    d = delta_of(model, "model.layers.0.mlp.down_proj")
    assert tuple(d.randlora_gamma.shape) == (4, 16)
    dw = d.delta_weight(None)
    assert tuple(dw.shape) == (16, 32) and torch.linalg.matrix_rank(dw.detach()) == 16


def test_identity_at_init_lambda_zero_gamma_one_over_m():
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("randlora", r=4, targets=["c_fc"]))
    d = delta_of(model, "transformer.h.0.mlp.c_fc")  # 16 -> 64: m = 16, n = 4
    assert torch.count_nonzero(d.randlora_lambda) == 0
    torch.testing.assert_close(d.randlora_gamma, torch.full((4, 16), 1 / 16))


@pytest.mark.parametrize("bases,flags", [("dense", {}), ("sparse", {"sparse": True}),
                                         ("very_sparse", {"very_sparse": True})])
def test_bases_are_peft_s_draws_from_the_seed(bases, flags):
    model, _ = make("gpt2")
    peft_model = peft.get_peft_model(model, peft.RandLoraConfig(r=4, projection_prng_key=7,
                                                                target_modules=PEFT_TARGETS["gpt2"], **flags))
    ours, _ = make("gpt2")
    deltatune.attach(ours, deltatune.config("randlora", r=4, projection_prng_key=7, bases=bases,
                                            targets=PEFT_TARGETS["gpt2"]))
    for key in SHARED:
        assert torch.equal(getattr(shared_of(ours), key), getattr(peft_model.base_model, key)["default"])
    if bases != "dense":
        assert set(shared_of(ours).randlora_A.unique().sign().tolist()) <= {-1.0, 0.0, 1.0}


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("randlora")  # r = 32: n = 18 bases, λ (32, 18) and γ (18, 576)
    assert deltatune.get_method("randlora").delta.num_parameters(cfg, LAYER_576, "x") == 18 * 32 + 18 * 576 == 10944


@pytest.mark.parametrize("field,value", [("r", 0), ("dropout", -0.1), ("bases", "dense-ish")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("randlora", **{field: value})


# ---- PEFT parity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("toy", ["gpt2", "llama"])
def test_same_weights_give_peft_s_logits(toy):
    cfg = peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=PEFT_TARGETS[toy])
    fields = {"r": 4, "alpha": 8.0, "targets": PEFT_TARGETS[toy]}
    x, peft_model, ours = peft_and_ours(cfg, "randlora", fields, toy, SHARED)
    torch.testing.assert_close(ours(x).logits, peft_model(x).logits, atol=1e-5, rtol=1e-5)


@needs_shared_keys_at_base_model
@pytest.mark.parametrize("toy", ["gpt2", "llama"])
def test_peft_saved_randlora_loads_in_deltatune(toy, tmp_path):
    cfg = peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=PEFT_TARGETS[toy])
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path)


@needs_shared_keys_at_base_model
@pytest.mark.parametrize("toy", ["gpt2", "llama"])
def test_deltatune_saved_randlora_loads_in_peft(toy, tmp_path):
    config = deltatune.config("randlora", r=4, alpha=8.0, targets=PEFT_TARGETS[toy])
    deltatune_saved_loads_in_peft(config, toy, tmp_path)


def test_deltatune_saved_seeded_randlora_loads_in_peft(tmp_path):
    """Without saved bases PEFT draws them again from the seed, the same draws as ours."""
    fields = {"r": 4, "alpha": 8.0, "targets": PEFT_TARGETS["llama"], "save_projection": False, "bases": "sparse"}
    deltatune_saved_loads_in_peft(deltatune.config("randlora", **fields), "llama", tmp_path)
