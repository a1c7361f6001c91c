"""BitFit: only biases change (merged or not), bias-less layers get one at merge, RMSNorm is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.bitfit  # noqa: F401
from deltatune import DeltatuneError

from toys import make, perturb, run


def test_update_is_a_bias_only_and_merge_changes_only_biases():
    model, x = make("mlp")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.attach(model, deltatune.config("bitfit", targets=["lin0", "lin1", "lin2", "norm"]))
    perturb(model, "default", seed=0)
    adapted = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-6, rtol=1e-5)
    merged = {k: v for k, v in model.state_dict().items() if ".deltatune." not in k}
    assert set(merged) == set(base) | {"lin1.bias"}  # lin1 had no bias: merging created one
    for key, value in merged.items():
        if key.endswith(".weight"):
            assert torch.equal(value, base[key]), f"{key} changed"
        else:
            delta = model.get_submodule(key.rsplit(".", 1)[0]).deltatune["default"].bias_delta
            torch.testing.assert_close(value, base.get(key, torch.zeros_like(value)) + delta)
    deltatune.unmerge(model)
    assert model.lin1.bias is None


def test_forward_adds_the_bias_delta_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    deltatune.attach(model, deltatune.config("bitfit", targets=["0"]))
    delta = model[0].deltatune["default"].bias_delta
    with torch.no_grad():
        delta.copy_(torch.arange(4.0))
    x = torch.randn(2, 3, 5, 5)
    with deltatune.use(model, None):
        base = model(x)
    torch.testing.assert_close(model(x), base + torch.arange(4.0).view(1, 4, 1, 1))


def test_parameter_count_is_the_output_widths():
    model = nn.ModuleDict({"q": nn.Linear(576, 576), "fc": nn.Linear(576, 1536), "ln": nn.LayerNorm(576)})
    deltatune.attach(model, deltatune.config("bitfit", targets=["q", "fc", "ln"]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 576 + 1536 + 576


def test_norm_without_a_bias_term_is_refused():
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match="bitfit: norm .*input_layernorm.*LlamaRMSNorm.*exclude it"):
        deltatune.attach(model, deltatune.config("bitfit", targets=["input_layernorm"]))
    assert not hasattr(model, "_deltatune_state")


def test_layernorm_without_bias_gets_one_at_merge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8, bias=False))
    deltatune.attach(model, deltatune.config("bitfit", targets=["0"]))
    perturb(model, "default", seed=1)
    x = torch.randn(3, 8)
    adapted = model(x).detach()
    deltatune.merge(model)
    torch.testing.assert_close(model(x), adapted)


def test_bitfit_has_no_fields_of_its_own():
    with pytest.raises(DeltatuneError, match="bitfit: unknown field"):
        deltatune.config("bitfit", r=4)
