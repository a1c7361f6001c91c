"""FourierFT: ΔW is the real inverse DFT of a sparse spectrum whose positions come from the seed and are never
saved; parameter count; PEFT parity (Linear and transformers Conv1D)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
import deltatune.methods.fourierft  # noqa: F401
from deltatune import DeltatuneError

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from test_loha import (  # noqa: E402
    LAYER_576, delta_of, deltatune_saved_loads_in_peft, peft_saved_loads_in_deltatune,
)
from toys import make, run  # noqa: E402

peft = pytest.importorskip("peft")

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
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("fourierft", n_frequency=5, seed=3, targets=["q_proj"]))
    entries = delta_of(model, Q).entries.clone()
    other, _ = make("llama")
    deltatune.attach(other, deltatune.config("fourierft", n_frequency=5, seed=4, targets=["q_proj"]))
    assert not torch.equal(delta_of(other, Q).entries, entries)
    out = run(model, x)
    deltatune.save(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"fourierft_spectrum"}
    fresh, _ = make("llama")
    deltatune.load(fresh, tmp_path / "a")
    assert torch.equal(delta_of(fresh, Q).entries, entries)
    torch.testing.assert_close(run(fresh, x), out)


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
def test_peft_saved_fourierft_loads_in_deltatune(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.FourierFTConfig(**kwargs), toy, tmp_path)


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_deltatune_saved_fourierft_loads_in_peft(toy, kwargs, tmp_path):
    renames = {"scaling": "alpha", "random_loc_seed": "seed"}
    deltatune_saved_loads_in_peft("fourierft", kwargs, toy, tmp_path, renames)
