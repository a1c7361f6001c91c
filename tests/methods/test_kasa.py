"""KaSA: the r minor singular components of W are dropped and an SVD-form LoRA B·diag(ΔΣ)·A learns the update."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.catalog import REFERENCE_LAYER
from test_spectral import linear_host

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "mlp": ["lin0", "lin1", "lin2"]}  # PEFT: Linear only


def _peft_claim_is_ours() -> None:
    kasa_json = {"kasa_config": {"beta": 1e-4, "gamma": 1e-3}, "use_dora": False}
    if deltatune.get_method("lora").peft.claims(kasa_json):
        pytest.xfail("lora's PEFT claim also takes configs with kasa_config; lora_peft must leave them to kasa")


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_peft_saved_loads_in_deltatune(toy, tmp_path):
    _peft_claim_is_ours()
    cfg = peft.LoraConfig(target_modules=TARGETS[toy], r=2, lora_alpha=6, init_lora_weights=False,
                          kasa_config=peft.KasaConfig(beta=0.01, gamma=0.02))
    ours = peft_saved_loads_in_deltatune(cfg, toy, tmp_path, scale=0.3)
    config = deltatune.adapters(ours)["default"]
    assert config.method == "kasa" and (config.beta, config.gamma, config.r, config.alpha) == (0.01, 0.02, 2, 6)


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_deltatune_saved_loads_in_peft(toy, tmp_path):
    config = deltatune.config("kasa", targets=TARGETS[toy], r=2, alpha=6)
    peft_model = deltatune_saved_loads_in_peft(config, toy, tmp_path)
    assert peft_model.peft_config["default"].kasa_config is not None


def test_base_becomes_its_best_rank_k_minus_r_approximation():
    model, delta, _ = linear_host("kasa", r=3)
    weight = model[0].weight.detach()
    with torch.no_grad():
        delta.lora_B.zero_()  # the LoRA branch off: what is left is the truncation
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    best = u[:, :5] @ torch.diag(sigma[:5]) @ vh[:5]  # k = 8, r = 3 dropped
    torch.testing.assert_close(weight + delta.delta_weight(None), best, atol=1e-5, rtol=1e-5)
    assert not deltatune.get_method("kasa").delta.identity_at_init


def test_update_puts_the_trainable_singular_values_between_b_and_a():
    model, delta, x = linear_host("kasa", r=2, alpha=4)
    truncation = -delta.minor_u @ delta.minor_v
    lora = delta.scaling * delta.lora_B @ torch.diag(delta.lora_diag) @ delta.lora_A
    torch.testing.assert_close(delta.delta_weight(None), (lora + truncation).detach(), atol=1e-6, rtol=1e-6)
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base + x @ (lora + truncation).detach().t(), atol=1e-5, rtol=1e-5)


def test_regularization_loss_is_the_papers():
    _, delta, _ = linear_host("kasa", r=2, beta=0.5, gamma=0.25)
    a, b, d = delta.lora_A, delta.lora_B, delta.lora_diag
    eye = torch.eye(2)
    expected = 0.5 * (d**2).sum() + 0.25 * (torch.linalg.norm(b.t() @ b - eye) + torch.linalg.norm(a @ a.t() - eye))
    torch.testing.assert_close(delta.regularization_loss(), expected)


def test_parameter_count_on_a_576x576_layer():
    spec = deltatune.get_method("kasa")
    expected = 8 * (576 + 576) + 8  # LoRA's A and B at r = 8, plus the 8 trainable singular values
    assert spec.delta.num_parameters(spec.config(), REFERENCE_LAYER, "layer") == expected == 9224
    assert sum(p.numel() for p in spec.delta(spec.config(), REFERENCE_LAYER, "layer").parameters()) == expected


def test_bad_inputs_name_the_field():
    with pytest.raises(deltatune.DeltatuneError, match="beta and gamma must be >= 0"):
        deltatune.config("kasa", beta=-1.0)
    with pytest.raises(deltatune.DeltatuneError, match="r=8 must be below"):
        linear_host("kasa", r=8)
