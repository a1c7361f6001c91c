"""The defining properties of LoRA, rsLoRA and DoRA, and the LoRA+ optimizer helper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import Host
from toys import make, perturb, run


def _delta(model, path, name="default"):
    module = model.get_submodule(path)
    return module, module.deltatune[name], Host(module, module.deltatune)


def test_lora_update_is_scaled_low_rank_product():
    model = nn.Sequential(nn.Linear(40, 30))
    deltatune.attach(model, deltatune.config("lora", r=3, alpha=12, targets=["0"], init="random"))
    module, delta, host = _delta(model, "0")
    dw = delta.delta_weight(host)
    torch.testing.assert_close(dw, (12 / 3) * delta.lora_B @ delta.lora_A)
    assert torch.linalg.matrix_rank(dw).item() == 3
    x = torch.randn(5, 40)
    torch.testing.assert_close(model(x), F.linear(x, module.weight + dw, module.bias))


def test_default_init_is_kaiming_a_zero_b_and_gaussian_std():
    model = nn.Sequential(nn.Linear(512, 64))
    deltatune.attach(model, deltatune.config("lora", r=16, targets=["0"]), name="k")
    deltatune.attach(model, deltatune.config("lora", r=16, targets=["0"], init="gaussian"), name="g")
    _, k, _ = _delta(model, "0", "k")
    _, g, _ = _delta(model, "0", "g")
    assert k.lora_B.abs().sum() == 0 and g.lora_B.abs().sum() == 0
    bound = 1 / math.sqrt(512)  # kaiming_uniform with a=√5 on fan_in 512
    assert k.lora_A.abs().max() <= bound and k.lora_A.abs().max() > 0.9 * bound
    assert g.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = nn.Sequential(nn.Linear(20, 20))
    deltatune.attach(model, deltatune.config("lora", r=16, alpha=8, targets=["0"], init="random"), name="plain")
    deltatune.attach(model, deltatune.config("rslora", r=16, alpha=8, targets=["0"], init="random"), name="rs")
    _, plain, host = _delta(model, "0", "plain")
    _, rs, _ = _delta(model, "0", "rs")
    with torch.no_grad():
        rs.lora_A.copy_(plain.lora_A)
        rs.lora_B.copy_(plain.lora_B)
    torch.testing.assert_close(rs.delta_weight(host), plain.delta_weight(host) * math.sqrt(16))


@pytest.mark.parametrize("toy,path", [("mlp", "lin0"), ("conv", "conv2d"), ("conv", "conv1d"),
                                      ("emb", "emb"), ("gpt2", "transformer.h.0.attn.c_attn")])
def test_dora_merged_weight_has_magnitude_as_channel_norms(toy, path):
    """DoRA's decomposition: each output channel of the merged weight has norm m_c, direction W + sBA."""
    from deltatune.core.hosts import to_matrix

    model, x = make(toy)
    deltatune.attach(model, deltatune.config("dora", r=2, targets=[path.rsplit(".", 1)[-1]], init="random"))
    module, delta, host = _delta(model, path)
    info = delta.info
    w0 = to_matrix(info, module.weight.detach().clone())
    # at init the magnitude is the norm of W + sBA, so the merged weight keeps its channel norms
    with torch.no_grad():
        delta.magnitude.mul_(torch.linspace(0.5, 1.5, delta.magnitude.numel()))
    deltatune.merge(model)
    merged = to_matrix(info, module.weight.detach())
    torch.testing.assert_close(merged.norm(dim=1), delta.magnitude.detach(), atol=1e-5, rtol=1e-5)
    direction = w0 + (delta.lora_B.reshape(info.out_features, -1) @ delta.lora_A.reshape(delta.r, -1)) * delta.scaling
    cos = F.cosine_similarity(merged, direction, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)


def test_dora_norm_is_constant_in_backward():
    """Paper §4.3: ‖W + sBA‖ is detached, so the magnitude's gradient is (output grad)·(W + sBA)x / ‖·‖."""
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    deltatune.attach(model, deltatune.config("dora", r=2, targets=["0"], init="random"))
    module, delta, host = _delta(model, "0")
    x = torch.randn(3, 6)
    model(x).sum().backward()
    v = module.weight + delta.lora_B @ delta.lora_A * delta.scaling
    expected = (x @ v.T).sum(0) / v.norm(dim=1)
    torch.testing.assert_close(delta.magnitude.grad, expected.detach(), atol=1e-5, rtol=1e-5)


def test_in_place_fast_path_gives_the_same_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8))
    deltatune.attach(model, deltatune.config("lora", r=3, alpha=6, targets=["0"], init="random"))
    _, delta, _ = _delta(model, "0")
    x = torch.randn(2, 5, 12)
    model(x).pow(2).sum().backward()
    a = delta.lora_A.detach().clone().requires_grad_()
    b = delta.lora_B.detach().clone().requires_grad_()
    ref = F.linear(x, model[0].weight, model[0].bias) + F.linear(F.linear(x, a), b) * 2.0
    ref.pow(2).sum().backward()
    torch.testing.assert_close(delta.lora_A.grad, a.grad)
    torch.testing.assert_close(delta.lora_B.grad, b.grad)


def test_lora_dropout_only_while_training():
    model = nn.Sequential(nn.Linear(50, 50))
    deltatune.attach(model, deltatune.config("lora", r=4, dropout=0.5, targets=["0"], init="random"))
    x = torch.randn(4, 50)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_lora_bias_on_embedding_is_refused():
    model, _ = make("emb")
    with pytest.raises(DeltatuneError, match="lora_bias is not available on embedding 'emb'"):
        deltatune.attach(model, deltatune.config("lora", targets=["emb"], lora_bias=True))


def test_bias_lora_only_trains_a_bias_update_and_merges_it():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("lora", targets=["lin0", "lin1"], bias="lora_only"))
    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert "lin0.deltatune.default.bias_delta" in names
    assert not any(n.startswith("lin1") and "bias" in n for n in names)  # lin1 has no bias
    perturb(model, "default", 0)
    out = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(run(model, x), out, atol=1e-5, rtol=1e-5)


def test_lora_plus_param_groups():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("dora", r=2, targets=["lin0", "lin2"], bias="lora_only"))
    groups = deltatune.optim.param_groups(model, lr=1e-3, lora_plus_ratio=16, weight_decay=0.1)
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr == {(1e-3, 0.1): 2, (16e-3, 0.1): 2, (1e-3, 0.0): 4}  # A's; B's; magnitudes + bias updates
    opt = torch.optim.AdamW(groups)
    run(model, x)
    model(x).sum().backward()
    opt.step()
    plain, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no trainable delta parameters"):
        deltatune.optim.param_groups(plain, lr=1e-3)
    with pytest.raises(DeltatuneError, match="must be > 0"):
        deltatune.optim.param_groups(model, lr=0)
