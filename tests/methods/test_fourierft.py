"""FourierFT: ΔW is the real inverse DFT of a sparse spectrum whose positions come from the seed and are never
saved; parameter count; PEFT parity (Linear and transformers Conv1D)."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.fourierft  # noqa: F401
from deltatune import DeltatuneError

from peft_roundtrip import deltatune_saved_loads_in_peft, from_peft_kwargs, peft, peft_saved_loads_in_deltatune
from test_loha import LAYER_576, delta_of
from toys import make, save_and_reload

Q = "model.layers.0.self_attn.q_proj"


def test_delta_weight_is_the_real_inverse_dft_of_the_seeded_sparse_spectrum():
    model, _ = make("llama")
    cfg = deltatune.config("fourierft", n_frequency=7, alpha=3.0, seed=11, targets=["v_proj"])
    deltatune.attach(model, cfg)
    d = delta_of(model, "model.layers.0.self_attn.v_proj")  # (8, 16)
    chosen = torch.randperm(8 * 16, generator=torch.Generator().manual_seed(11))[:7]
    spectrum = torch.zeros(8 * 16, dtype=torch.complex64)
    spectrum[chosen] = d.fourierft_spectrum.detach().to(torch.complex64)
    expected = torch.fft.ifft2(spectrum.reshape(8, 16)).real * 3.0
    torch.testing.assert_close(d.delta_weight(None).detach(), expected)
    # Its 2-D spectrum is the sparse one, symmetrised: F/2 at the chosen entries plus its conjugate mirror.
    support = torch.fft.fft2(d.delta_weight(None).detach()).abs() > 1e-4
    assert support.sum() <= 2 * 7 and support.flatten()[chosen].all()


def test_positions_regenerate_from_the_seed_and_are_not_saved(tmp_path):
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("fourierft", n_frequency=5, seed=3, targets=["q_proj"]))
    entries = delta_of(model, Q).entries.clone()
    other, _ = make("llama")
    deltatune.attach(other, deltatune.config("fourierft", n_frequency=5, seed=4, targets=["q_proj"]))
    assert not torch.equal(delta_of(other, Q).entries, entries)
    keys, fresh = save_and_reload(model, "llama", tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"fourierft_spectrum"}
    assert torch.equal(delta_of(fresh, Q).entries, entries)


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("fourierft")  # n = 1000 coefficients, whatever the layer width
    assert deltatune.get_method("fourierft").delta.num_parameters(cfg, LAYER_576, "x") == 1000


def test_bad_values_are_refused():
    with pytest.raises(DeltatuneError, match="n_frequency must be > 0"):
        deltatune.config("fourierft", n_frequency=0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="n_frequency=61 exceeds the 3×20 entries of 'lin2'"):
        deltatune.attach(model, deltatune.config("fourierft", n_frequency=61, targets=["lin2"]))


PEFT_CASES = [
    ("llama", {"n_frequency": 9, "scaling": 7.0, "random_loc_seed": 5,
               "target_modules": ["q_proj", "v_proj"]}),
    ("gpt2", {"n_frequency": 6, "scaling": 3.0, "target_modules": ["c_attn", "c_fc"],
              "n_frequency_pattern": {"c_fc": 11}}),
]


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_peft_parity_both_ways(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.FourierFTConfig(**kwargs), toy, tmp_path)
    ours = from_peft_kwargs("fourierft", kwargs, {"scaling": "alpha", "random_loc_seed": "seed"})
    deltatune_saved_loads_in_peft(ours, toy, tmp_path)
