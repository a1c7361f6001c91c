"""QR-LoRA: Q is the frozen orthonormal basis of W's top-r principal part, only ΔR trains, ΔW = s·Q·ΔR stays in
that span, identity at init, Q travels with the adapter, half of LoRA's parameters, bad configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.qr_lora  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.delta import mixed_batch_path
from deltatune.methods.lora import LoraDelta
from deltatune.methods.qr_lora import QrLoraDelta
from test_oft import LAYER_576, attach_linear


def _linear(**fields):
    return attach_linear("qr_lora", 20, 16, **fields)


def test_q_is_the_frozen_orthonormal_basis_of_the_principal_subspace():
    model, delta, host = _linear(r=4, alpha=8, init="random")
    q = delta.lora_B.detach()
    torch.testing.assert_close(q.t() @ q, torch.eye(4), atol=1e-5, rtol=0)
    u = torch.linalg.svd(model[0].weight.detach()).U[:, :4]
    torch.testing.assert_close(q @ (q.t() @ u), u, atol=1e-5, rtol=0)  # span(Q) = span(U_r)
    dw = delta.delta_weight(host).detach()
    torch.testing.assert_close(dw, 2.0 * q @ delta.lora_A.detach(), atol=1e-6, rtol=0)  # s = alpha / r
    torch.testing.assert_close(q @ (q.t() @ dw), dw, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.deltatune.default.lora_A"}


def test_identity_at_init_and_only_delta_r_moves():
    model, delta, host = _linear(r=2)
    assert delta.delta_weight(host).abs().max() == 0
    q = delta.lora_B.detach().clone()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    model(torch.randn(4, 20)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(delta.lora_B, q) and delta.lora_A.abs().max() > 0


def test_q_is_saved_with_the_adapter(tmp_path):
    model, delta, _ = _linear(r=2, init="random")
    x = torch.randn(3, 20)
    expected = model(x)
    deltatune.save(model, tmp_path / "a")
    other = nn.Sequential(nn.Linear(20, 16))
    other.load_state_dict({k: v for k, v in model.state_dict().items() if ".deltatune." not in k})
    deltatune.load(other, tmp_path / "a")
    assert torch.equal(other[0].deltatune["default"].lora_B, delta.lora_B)
    torch.testing.assert_close(other(x), expected)


def test_parameter_count_is_half_of_loras_on_a_square_layer():
    cfg = deltatune.config("qr_lora", r=8)
    assert QrLoraDelta.num_parameters(cfg, LAYER_576, "l") == 8 * 576
    assert 2 * QrLoraDelta.num_parameters(cfg, LAYER_576, "l") == LoraDelta.num_parameters(cfg, LAYER_576, "l")


def test_mixed_batches_use_loras_gathered_kernel():
    assert mixed_batch_path(QrLoraDelta) == "gathered"


def test_bad_config_names_the_field():
    with pytest.raises(DeltatuneError, match="init"):
        deltatune.config("qr_lora", init="gaussian")
    with pytest.raises(DeltatuneError, match="rank 17 exceeds 16"):
        _linear(r=17)
