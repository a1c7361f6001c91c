"""C³A: ΔW is block-circulant, the FFT forward equals the dense matrix, parameter count, PEFT parity."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.c3a  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.c3a import block_circulant, circular_correlate, kernel_spectrum

from peft_roundtrip import deltatune_saved_loads_in_peft, from_peft_kwargs, peft, peft_saved_loads_in_deltatune
from test_loha import LAYER_576, delta_of
from toys import make


def test_delta_weight_is_block_circulant():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("c3a", block_size=4, targets=["down_proj"]))
    d = delta_of(model, "model.layers.0.mlp.down_proj")  # (16, 32): 4×8 blocks of 4×4
    weight = d.delta_weight(None).detach() * 32  # undo the 1/fan_in normalisation
    for i in range(4):
        for j in range(8):
            block = weight[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            for t in range(4):  # each row is the first row shifted right by t
                torch.testing.assert_close(block[t], torch.roll(block[0], t))
            torch.testing.assert_close(block[0], d.c3a_kernel[i, j].detach())


def test_fft_path_equals_the_dense_matrix():
    kernel = torch.randn(3, 5, 8, dtype=torch.float64)
    x = torch.randn(2, 7, 40, dtype=torch.float64)
    fft_path = circular_correlate(x, kernel_spectrum(kernel), 8)
    torch.testing.assert_close(fft_path, x @ block_circulant(kernel).t())
    model, _ = make("gpt2")  # the FFT path on a transformers Conv1D host against the merged weight
    deltatune.attach(model, deltatune.config("c3a", block_size=8, targets=["c_fc"]))
    module = model.get_submodule("transformer.h.1.mlp.c_fc")
    h = torch.randn(2, 3, 16)
    with deltatune.use(model, None):
        base = module(h)
    torch.testing.assert_close(module(h), base + h @ module.deltatune["default"].delta_weight(None), atol=1e-5,
                               rtol=1e-5)


def test_dense_matrix_matches_peft_circulant_construction():
    from peft.tuners.c3a.utils import get_circulant_fast

    kernel = torch.randn(2, 3, 4)
    torch.testing.assert_close(block_circulant(kernel), get_circulant_fast(kernel), atol=1e-5, rtol=1e-5)


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("c3a")  # b = 64: (576/64)² circulant blocks of 64 values
    assert deltatune.get_method("c3a").delta.num_parameters(cfg, LAYER_576, "x") == 576 * 576 // 64 == 5184


def test_block_size_must_divide_the_layer():
    with pytest.raises(DeltatuneError, match="block_size must be > 0"):
        deltatune.config("c3a", block_size=0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match=r"block_size 4 does not divide 'lin0' \(20×10\).*gcd is 10"):
        deltatune.attach(model, deltatune.config("c3a", block_size=4, targets=["lin0"]))


PEFT_CASES = [
    ("llama", {"block_size": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("llama", {"block_size": 8, "target_modules": ["q_proj", "down_proj"], "block_size_pattern": {"q_proj": 2},
               "init_weights": "gaussian"}),
]


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_peft_parity_both_ways(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.C3AConfig(**kwargs), toy, tmp_path)
    deltatune_saved_loads_in_peft(from_peft_kwargs("c3a", kwargs, {"init_weights": "init"}), toy, tmp_path)
