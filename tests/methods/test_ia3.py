"""(IA)³: which activation each vector scales, identity at init, parameter counts, PEFT parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
import deltatune.methods.ia3  # noqa: F401
from deltatune import DeltatuneError

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from toys import make


def _vector(model, path, name="default"):
    return model.get_submodule(path).deltatune[name].ia3_l


def test_output_side_scales_the_biased_output_and_input_side_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    deltatune.attach(model, deltatune.config("ia3", targets=["0", "2"], feedforward_modules=["2"]))
    assert _vector(model, "0").shape == (5,) and _vector(model, "2").shape == (5,)  # out of 0, in of 2
    assert torch.equal(_vector(model, "0"), torch.ones(5)) and torch.equal(_vector(model, "2"), torch.ones(5))
    x = torch.randn(3, 6)
    with deltatune.use(model, None):
        expected_base = model(x)
    torch.testing.assert_close(model(x), expected_base)  # l = 1 at init: identity
    with torch.no_grad():
        _vector(model, "0").copy_(torch.linspace(0.5, 2.0, 5))
        _vector(model, "2").copy_(torch.linspace(-1.0, 3.0, 5))
    first, last = model[0], model[2]
    hidden = torch.relu(torch.linspace(0.5, 2.0, 5) * F.linear(x, first.weight, first.bias))
    expected = F.linear(torch.linspace(-1.0, 3.0, 5) * hidden, last.weight, last.bias)
    torch.testing.assert_close(model(x), expected)
    deltatune.merge(model)  # ΔW = diag(l-1)·W and W·diag(l-1); Δb = (l-1)⊙b on the output side only
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_conv_scales_output_channels_and_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3))
    deltatune.attach(model, deltatune.config("ia3", targets=["0", "1"], feedforward_modules=r"1"))
    out_l, in_l = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    with torch.no_grad():
        _vector(model, "0").copy_(out_l)
        _vector(model, "1").copy_(in_l)
    x = torch.randn(2, 3, 6, 6)
    with deltatune.use(model, None):
        h = model[0](x) * out_l.view(1, -1, 1, 1)
        expected = model[1](h * in_l.view(1, -1, 1, 1))
    torch.testing.assert_close(model(x), expected)


def test_feedforward_matching_follows_peft():
    cfg = deltatune.config("ia3", feedforward_modules=["down_proj", "mlp.c_proj"])
    assert cfg.is_feedforward("model.layers.0.mlp.down_proj")
    assert cfg.is_feedforward("transformer.h.0.mlp.c_proj") and not cfg.is_feedforward("transformer.h.0.attn.c_proj")
    regex = deltatune.config("ia3", feedforward_modules=r".*\.mlp\.c_proj")
    assert regex.is_feedforward("transformer.h.1.mlp.c_proj") and not regex.is_feedforward("mlp.c_proj.x")
    assert not deltatune.config("ia3").is_feedforward("model.layers.0.mlp.down_proj")


def test_parameter_count_is_one_vector_per_layer():
    model = nn.ModuleDict({"k_proj": nn.Linear(576, 192), "v_proj": nn.Linear(576, 192),
                           "down_proj": nn.Linear(1536, 576)})
    deltatune.attach(model, deltatune.config("ia3", targets=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 192 + 192 + 1536


def test_bad_inputs():
    with pytest.raises(DeltatuneError, match="feedforward_modules"):
        deltatune.config("ia3", feedforward_modules="(unclosed")
    with pytest.raises(DeltatuneError, match="ia3.feedforward_modules must be"):
        deltatune.config("ia3", feedforward_modules=3)
    model, _ = make("emb")
    with pytest.raises(DeltatuneError, match="embedding.*feedforward_modules"):
        deltatune.attach(model, deltatune.config("ia3", targets=["emb"], feedforward_modules=["emb"]))


# ---- PEFT parity ------------------------------------------------------------------------------------------------
PARITY = {
    "llama": (["q_proj", "v_proj", "down_proj", "up_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "c_proj", "c_fc"], r".*mlp\.c_proj"),
    "conv": (["conv2d", "head"], ["head"]),
}


@pytest.mark.parametrize("toy", sorted(PARITY))
def test_peft_saved_loads_in_deltatune(toy, tmp_path):
    targets, feedforward = PARITY[toy]
    cfg = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path, merge_ours=True)


@pytest.mark.parametrize("toy", sorted(PARITY))
def test_deltatune_saved_loads_in_peft(toy, tmp_path):
    targets, feedforward = PARITY[toy]
    config = deltatune.config("ia3", targets=targets, feedforward_modules=feedforward)
    deltatune_saved_loads_in_peft(config, toy, tmp_path)
