"""LoKr: ΔW is the Kronecker product, the factored forward equals it, LyCORIS's factorization, PEFT parity."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.lokr  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.lokr import factorization

from peft_roundtrip import deltatune_saved_loads_in_peft, from_peft_kwargs, peft, peft_saved_loads_in_deltatune
from test_loha import LAYER_576, delta_of
from toys import make


def test_delta_weight_is_the_kronecker_product():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("lokr", r=1, alpha=3, targets=["q_proj"], decompose_both=True,
                                             init="random"))
    d = delta_of(model, "model.layers.0.self_attn.q_proj")
    w1, w2 = d.lokr_w1_a @ d.lokr_w1_b, d.lokr_w2_a @ d.lokr_w2_b  # 16 = 4·4 both sides, factored at r = 1
    assert w1.shape == (4, 4) and w2.shape == (4, 4)
    kron = torch.einsum("ac,bd->abcd", w1, w2).reshape(16, 16)  # (W₁ ⊗ W₂)[(a,b),(c,d)] = W₁[a,c]·W₂[b,d]
    torch.testing.assert_close(d.delta_weight(None), kron * 3.0)


def test_factored_forward_equals_the_dense_kronecker_matrix():
    model, _ = make("gpt2")  # transformers Conv1D: weight stored (in, out)
    deltatune.attach(model, deltatune.config("lokr", r=2, targets=["c_fc"], init="random"))
    module = model.get_submodule("transformer.h.0.mlp.c_fc")
    d = module.deltatune["default"]
    x = torch.randn(2, 5, 16)
    with deltatune.use(model, None):
        base = module(x)
    torch.testing.assert_close(module(x), base + x @ d.delta_weight(None), atol=1e-5, rtol=1e-5)


def test_conv_kernel_rides_on_the_second_factor():
    model, _ = make("conv")
    deltatune.attach(model, deltatune.config("lokr", r=2, targets=["conv2d"], init="random"))
    d = delta_of(model, "conv2d")  # out 6 = 2·3, in 3 = 1·3, full W₂ (3, 3, 3, 3)
    expected = torch.einsum("ac,bdkl->abcdkl", d.lokr_w1, d.lokr_w2).reshape(6, 3, 3, 3) * d.scaling
    torch.testing.assert_close(d.delta_weight(None), expected)


@pytest.mark.parametrize("dim,factor,expected", [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)),
                                                 (128, 4, (4, 32)), (576, -1, (24, 24)), (20, -1, (4, 5))])
def test_factorization_follows_lycoris(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_parameter_count_on_a_576_layer():
    # 576 = 24·24 on both sides; r = 8 < 24/2, so W₁ (24×24) is full and W₂ = w2_a·w2_b has 8·(24 + 24).
    cfg = deltatune.config("lokr")
    assert deltatune.get_method("lokr").delta.num_parameters(cfg, LAYER_576, "x") == 24 * 24 + 8 * 48 == 960


def test_full_second_factor_on_conv1d_is_refused():
    model, _ = make("conv")
    with pytest.raises(DeltatuneError, match="full-rank W₂ on Conv1d 'conv1d'"):
        deltatune.attach(model, deltatune.config("lokr", r=3, targets=["conv1d"]))


def test_bad_decompose_factor_names_the_field():
    with pytest.raises(DeltatuneError, match="decompose_factor"):
        deltatune.config("lokr", decompose_factor=0)


PEFT_CASES = [
    ("llama", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("llama", {"r": 1, "target_modules": ["q_proj", "down_proj"], "decompose_both": True,
               "decompose_factor": 4}),
    ("conv", {"r": 2, "alpha": 3, "target_modules": ["conv2d", "conv1d", "head"],
              "use_effective_conv2d": True}),
    ("conv", {"r": 1, "target_modules": ["conv2d", "conv1d", "head"]}),
]


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_peft_parity_both_ways(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.LoKrConfig(init_weights=False, **kwargs), toy, tmp_path)
    deltatune_saved_loads_in_peft(from_peft_kwargs("lokr", kwargs), toy, tmp_path)
