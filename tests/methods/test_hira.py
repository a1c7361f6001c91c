"""HiRA: ΔW = W0 ⊙ (B·A), high rank from a rank-r product; PEFT parity both ways.

Also holds the helpers the other low-rank-variant tests share (a one-layer host, parameter counts).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.core.slot import Host
from deltatune.methods import hira  # noqa: F401
from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from toys import make, perturb, run


# ---- shared helpers -------------------------------------------------------------------------------------------------
def attached(model: nn.Module, path: str, method: str, seed: int | None = 0, **fields):
    """Attach `method` at `path` (perturbed by `seed` unless None); returns (module, delta, host)."""
    deltatune.attach(model, deltatune.config(method, targets=[path.rsplit(".", 1)[-1]], **fields))
    if seed is not None:
        perturb(model, "default", seed)
    module = model.get_submodule(path)
    return module, module.deltatune["default"], Host(module, module.deltatune)


def linear(method: str, out: int = 12, inp: int = 16, seed: int | None = 0, **fields):
    """A one-Linear model with `method` attached; returns (model, delta, host)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inp, out))
    _, delta, host = attached(model, "0", method, seed, **fields)
    return model, delta, host


def layer_count(method: str, **fields) -> int:
    """Trainable parameters of `method` on one 576×576 Linear."""
    model = nn.Sequential(nn.Linear(576, 576))
    deltatune.attach(model, deltatune.config(method, targets=["0"], **fields))
    return sum(p.numel() for p in deltatune.trainable_parameters(model))


# ---- HiRA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("toy,path", [("mlp", "lin0"), ("conv", "conv2d"), ("conv", "conv1d"), ("emb", "emb"),
                                      ("gpt2", "transformer.h.0.attn.c_attn")])
def test_update_is_base_weight_hadamard_low_rank_product(toy, path):
    model, x = make(toy)
    module, delta, host = attached(model, path, "hira", r=2)
    info = delta.info
    product = delta.hira_B.reshape(info.out_features, -1) @ delta.hira_A.reshape(delta.r, -1)
    expected = to_matrix(info, module.weight.detach()) * product
    torch.testing.assert_close(to_matrix(info, delta.delta_weight(host)), expected)
    adapted = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(to_matrix(info, module.weight.detach()), to_matrix(info, host.weight()) + expected)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_rank_one_factors_give_a_full_rank_update():
    """W0 ⊙ (b aᵀ) = diag(b)·W0·diag(a): rank(W0), far above r = 1."""
    _, delta, host = linear("hira", out=12, inp=16, r=1)
    assert torch.linalg.matrix_rank(delta.delta_weight(host)).item() == 12


def test_default_init_is_identity_and_embedding_init_follows_peft():
    model, delta, host = linear("hira", seed=None)
    assert delta.hira_B.abs().sum() == 0 and delta.hira_A.abs().sum() > 0
    emb, _ = make("emb")
    _, edelta, _ = attached(emb, "emb", "hira", seed=None)
    assert edelta.hira_A.abs().sum() == 0 and edelta.hira_B.abs().sum() > 0  # A = 0, B normal on embeddings


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("hira", r=8) == 8 * (576 + 576)


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "c_fc"],
           "conv": ["conv2d", "conv1d", "head"]}


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_peft_saved_hira_loads_in_deltatune(toy, tmp_path):
    config = peft.HiraConfig(r=2, target_modules=TARGETS[toy], init_weights=False)
    peft_saved_loads_in_deltatune(config, toy, tmp_path)


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_deltatune_saved_hira_loads_in_peft(toy, tmp_path):
    deltatune_saved_loads_in_peft(deltatune.config("hira", r=2, targets=TARGETS[toy]), toy, tmp_path)


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="hira: r must be > 0"):
        deltatune.config("hira", r=0)
