"""LoRA-XS: frozen SVD factors of the base weight around a trainable r × r matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.lora_xs  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host

from toys import make, perturb, save_and_reload


def _linear(width_in=24, width_out=18, **fields):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width_in, width_out))
    deltatune.attach(model, deltatune.config("lora_xs", targets=["0"], **fields))
    module = model[0]
    return model, module, module.deltatune["default"]


def test_frozen_factors_are_the_truncated_svd_of_the_base_weight():
    model, module, delta = _linear(r=4, alpha=8)
    u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
    # B = U_r, A = Σ_r V_rᵀ (singular values on the input side, as the authors' code), up to one sign per pair
    signs = torch.sign((delta.lora_B * u[:, :4]).sum(0))
    torch.testing.assert_close(delta.lora_B, u[:, :4] * signs)
    torch.testing.assert_close(delta.lora_A, (s[:4, None] * vh[:4]) * signs[:, None], atol=1e-5, rtol=1e-5)
    # the sign rule: each column of B has its largest-magnitude entry positive
    pivot = delta.lora_B.abs().argmax(0)
    assert (delta.lora_B[pivot, torch.arange(4)] > 0).all()
    # B·A is the best rank-4 approximation of W
    torch.testing.assert_close(delta.lora_B @ delta.lora_A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)


def test_update_is_s_b_r_a_and_only_r_trains():
    model, module, delta = _linear(r=3, alpha=6)
    with torch.no_grad():
        delta.lora_R.normal_()
    host = Host(module, module.deltatune)
    torch.testing.assert_close(delta.delta_weight(host), 2.0 * delta.lora_B @ delta.lora_R @ delta.lora_A)
    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert names == ["0.deltatune.default.lora_R"]
    frozen = {n: b.clone() for n, b in delta.named_buffers()}
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.5)
    model(torch.randn(5, 24)).pow(2).sum().backward()
    opt.step()
    assert all(torch.equal(b, frozen[n]) for n, b in delta.named_buffers())


def test_factors_are_not_saved_and_are_rebuilt_from_the_base_weight(tmp_path):
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("lora_xs", r=2, targets=["q_proj", "embed_tokens"]))
    perturb(model, "default", 0)
    keys, fresh = save_and_reload(model, "llama", tmp_path)
    assert keys and all(k.endswith(".lora_R") for k in keys)
    path = "model.layers.0.self_attn.q_proj"
    old, new = model.get_submodule(path).deltatune["default"], fresh.get_submodule(path).deltatune["default"]
    assert torch.equal(old.lora_A, new.lora_A) and torch.equal(old.lora_B, new.lora_B)


def test_parameter_count_is_r_squared_for_a_576_layer():
    model = nn.Sequential(nn.Linear(576, 576))
    deltatune.attach(model, deltatune.config("lora_xs", r=16, targets=["0"]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 256
    spec = deltatune.get_method("lora_xs")
    assert spec.delta.num_parameters(deltatune.adapters(model)["default"], model[0].deltatune.info, "0") == 16**2


def test_init_is_near_identity_and_exact_with_init_std_zero():
    _, _, delta = _linear(r=4)
    assert 0 < delta.lora_R.abs().max() < 1e-4  # N(0, 1e-5²), the authors' init
    model, _, delta = _linear(r=4, init_std=0.0)
    x = torch.randn(3, 24)
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    assert not deltatune.get_method("lora_xs").delta.identity_at_init


@pytest.mark.parametrize("toy,path", [("conv", "conv2d"), ("emb", "emb"), ("gpt2", "transformer.h.0.attn.c_attn")])
def test_update_rank_is_at_most_r_on_every_host_kind(toy, path):
    from deltatune.core.hosts import to_matrix

    model, _ = make(toy)
    deltatune.attach(model, deltatune.config("lora_xs", r=2, targets=[path.rsplit(".", 1)[-1]]))
    perturb(model, "default", 0)
    module = model.get_submodule(path)
    delta = module.deltatune["default"]
    dw = to_matrix(delta.info, delta.delta_weight(Host(module, module.deltatune)))
    assert torch.linalg.matrix_rank(dw).item() == 2


@pytest.mark.parametrize("fields,field", [({"init_std": -1.0}, "init_std"), ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout")])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("lora_xs", **fields)


def test_rank_above_the_layer_size_is_refused():
    with pytest.raises(DeltatuneError, match="rank 30 exceeds 18"):
        _linear(r=30)
