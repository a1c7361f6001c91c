"""DeLoRA: normalised rank-one directions, strength set by λ alone, ‖ΔW‖ ≤ |λ|·‖W‖; PEFT parity both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.methods import delora  # noqa: F401

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from test_hira import layer_count, linear


def test_update_formula():
    model, delta, host = linear("delora", r=3, delora_lambda=2.0, init="random")
    a, b, lam = delta.delora_A, delta.delora_B, delta.delora_lambda
    w_norm = model[0].weight.detach().norm(dim=0)
    expected = (b / b.norm(dim=0)) @ (a / a.norm(dim=1, keepdim=True)) * (lam / 3) * w_norm
    torch.testing.assert_close(delta.delta_weight(host), expected)


@pytest.mark.parametrize("seed", range(5))
def test_update_norm_is_bounded_by_lambda_times_weight_norm(seed):
    model, delta, host = linear("delora", r=4, delora_lambda=3.0, init="random", seed=seed)
    with torch.no_grad():
        delta.delora_A.mul_(50)  # the raw factor scale does not matter
    spectral = torch.linalg.matrix_norm(model[0].weight.detach(), ord=2)
    assert torch.linalg.matrix_norm(delta.delta_weight(host)) <= delta.delora_lambda.abs() * spectral + 1e-5


def test_angles_are_decoupled_from_strength():
    _, delta, host = linear("delora", r=2, delora_lambda=1.5, init="random")
    before = delta.delta_weight(host).detach()
    with torch.no_grad():
        delta.delora_B.mul_(torch.tensor([7.0, 0.2]))  # rescaling any factor column / row leaves ΔW unchanged
        delta.delora_A.mul_(3.0)
    torch.testing.assert_close(delta.delta_weight(host), before)
    with torch.no_grad():
        delta.delora_lambda.mul_(2)
    torch.testing.assert_close(delta.delta_weight(host), 2 * before)


def test_weight_norm_is_measured_once_saved_and_unmoved_by_merging(tmp_path):
    model, delta, host = linear("delora", r=2, init="random")
    torch.testing.assert_close(delta.delora_w_norm, model[0].weight.detach().norm(dim=0))
    before = delta.delta_weight(host).detach()
    deltatune.merge(model)
    torch.testing.assert_close(delta.delta_weight(host), before)
    assert "delora_w_norm" in delta.state_tensors(host)


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("delora", r=8) == 8 * (576 + 576) + 1  # A, B and the scalar λ


TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_peft_saved_delora_loads_in_deltatune(tmp_path):
    config = peft.DeloraConfig(r=2, delora_lambda=3, target_modules=TARGETS, init_weights=False)
    peft_saved_loads_in_deltatune(config, "llama", tmp_path)


def test_deltatune_saved_delora_loads_in_peft(tmp_path):
    config = deltatune.config("delora", r=2, delora_lambda=3.0, init="random", targets=TARGETS)
    deltatune_saved_loads_in_peft(config, "llama", tmp_path)


def test_bad_dropout_names_the_field():
    with pytest.raises(DeltatuneError, match=r"delora: dropout must be in \[0, 1\)"):
        deltatune.config("delora", dropout=1.0)
