"""LN-Tuning: only norm gains/biases change, the forward is the norm with tuned parameters, PEFT parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
import deltatune.methods.ln_tuning  # noqa: F401
from deltatune import DeltatuneError

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from toys import make, perturb, run


def test_forward_is_the_norm_with_tuned_gain_and_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8))
    deltatune.attach(model, deltatune.config("ln_tuning", targets=["0"]))
    perturb(model, "default", seed=0)
    delta = model[0].deltatune["default"]
    x = torch.randn(2, 3, 8)
    norm = model[0]
    expected = F.layer_norm(x, (8,), norm.weight + delta.weight_delta, norm.bias + delta.bias_delta, norm.eps)
    torch.testing.assert_close(model(x), expected)


def test_touches_only_norm_parameters():
    model, x = make("gpt2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.attach(model, deltatune.config("ln_tuning", targets=r".*ln_(1|2|f)"))
    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert names and all(".ln_" in n for n in names)
    perturb(model, "default", seed=0)
    adapted = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)
    changed = {k for k, v in model.state_dict().items() if ".deltatune." not in k and not torch.equal(v, base[k])}
    assert changed and all(".ln_" in k for k in changed)


def test_parameter_count_is_gain_plus_bias():
    model = nn.ModuleDict({"ln": nn.LayerNorm(576), "rms": nn.RMSNorm(576)})
    deltatune.attach(model, deltatune.config("ln_tuning", targets=["ln", "rms"]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 2 * 576 + 576


def test_non_norm_layers_are_not_hosts():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="lin0"):
        deltatune.attach(model, deltatune.config("ln_tuning", targets=["lin0"]))
    with pytest.raises(DeltatuneError, match="ln_tuning: unknown field"):
        deltatune.config("ln_tuning", r=2)


# ---- PEFT parity ------------------------------------------------------------------------------------------------
PARITY = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "gpt2": ["ln_1", "ln_2"], "mlp": ["norm"]}


@pytest.mark.parametrize("toy", sorted(PARITY))
def test_peft_saved_loads_in_deltatune(toy, tmp_path):
    cfg = peft.LNTuningConfig(target_modules=PARITY[toy])
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path, merge_ours=True)


@pytest.mark.parametrize("toy", sorted(PARITY))
def test_deltatune_saved_loads_in_peft(toy, tmp_path):
    deltatune_saved_loads_in_peft(deltatune.config("ln_tuning", targets=PARITY[toy]), toy, tmp_path)
