"""PaCA: ΔW lives only in the r selected columns; the forward touches only those input features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
import deltatune.methods.paca  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host


def _attach(model, **fields):
    deltatune.attach(model, deltatune.config("paca", targets=["0"], **fields))
    module = model[0]
    delta = module.deltatune["default"]
    with torch.no_grad():
        delta.paca_delta.normal_()
    return module, delta, delta.delta_weight(Host(module, module.deltatune))


def test_delta_is_nonzero_only_in_the_selected_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 576))
    module, delta, dw = _attach(model, r=16, alpha=32)
    columns = dw.abs().amax(0).nonzero().flatten()
    assert torch.equal(columns, delta.paca_indices) and columns.numel() == 16
    torch.testing.assert_close(dw[:, delta.paca_indices], delta.paca_delta * 2.0)
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 576 * 16
    x = torch.randn(2, 3, 576)
    torch.testing.assert_close(model(x), F.linear(x, module.weight + dw, module.bias), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_columns_are_input_features():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(12, 20))  # weight (in=20, out=12)
    module, delta, dw = _attach(model, r=4)
    assert dw.shape == (20, 12)
    assert torch.equal(dw.abs().amax(1).nonzero().flatten(), delta.paca_indices)


def test_columns_are_reproducible_from_the_seed():
    def columns(seed):
        model = nn.Sequential(nn.Linear(64, 8))
        deltatune.attach(model, deltatune.config("paca", targets=["0"], r=8, seed=seed))
        return model[0].deltatune["default"].paca_indices

    assert torch.equal(columns(3), columns(3)) and not torch.equal(columns(3), columns(4))


def test_bad_inputs():
    with pytest.raises(DeltatuneError, match="paca: r must be > 0"):
        deltatune.config("paca", r=0)
    with pytest.raises(DeltatuneError, match="r=11 exceeds the 10 columns of '0'"):
        deltatune.attach(nn.Sequential(nn.Linear(10, 4)), deltatune.config("paca", targets=["0"], r=11))
