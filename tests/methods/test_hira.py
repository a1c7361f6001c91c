"""HiRA: ΔW = W0 ⊙ (B·A), high rank from a rank-r product; PEFT parity both ways.

Also holds the helpers the other low-rank-variant tests share (a one-layer host, PEFT round trips).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared toy models
import deltatune  # noqa: E402
from deltatune import DeltatuneError  # noqa: E402
from deltatune.core.hosts import to_matrix  # noqa: E402
from deltatune.core.slot import Host  # noqa: E402
from deltatune.methods import hira  # noqa: E402, F401
from toys import make, perturb, run  # noqa: E402

peft = pytest.importorskip("peft")


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


def randomise_peft(model: nn.Module, prefix: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def check_peft_saved_loads(peft_config, toy: str, prefix: str, tmp_path) -> None:
    """A PEFT-saved adapter with random weights gives PEFT's logits once loaded by deltatune."""
    model, x = make(toy)
    peft_model = peft.get_peft_model(model, peft_config)
    randomise_peft(peft_model, prefix, 0)
    peft_model.eval()
    expected = run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "p")
    ours, _ = make(toy)
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


def check_deltatune_saved_loads(method: str, fields: dict, targets: list[str], toy: str, tmp_path) -> None:
    """A deltatune-saved adapter gives deltatune's logits once loaded by PEFT."""
    model, x = make(toy)
    deltatune.attach(model, deltatune.config(method, targets=targets, **fields))
    perturb(model, "default", seed=0)
    expected = run(model, x)
    deltatune.save(model, tmp_path / "d")
    fresh, _ = make(toy)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "d").eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)


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
    check_peft_saved_loads(config, toy, "hira_", tmp_path)


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_deltatune_saved_hira_loads_in_peft(toy, tmp_path):
    check_deltatune_saved_loads("hira", {"r": 2}, TARGETS[toy], toy, tmp_path)


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="hira: r must be > 0"):
        deltatune.config("hira", r=0)
