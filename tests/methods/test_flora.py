"""FLoRA (N-d Tucker): the core and per-mode factors reproduce ΔW in the layer's own shape, each mode's
unfolding has the core's rank, parameter count."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.flora  # noqa: F401
from deltatune import DeltatuneError

from test_loha import LAYER_576, delta_of
from toys import make, perturb


def test_conv_update_is_the_tucker_product_in_the_kernel_shape():
    model, _ = make("conv")
    deltatune.attach(model, deltatune.config("flora", r=2, kernel_r=1, scale=3.0, targets=["conv2d"]))
    perturb(model, "default", seed=0)
    d = delta_of(model, "conv2d")  # weight (6, 3, 3, 3)
    k1, k2 = d.flora_kernel
    expected = torch.einsum("abcd,ia,ob,kc,ld->oikl", d.flora_core, d.flora_in, d.flora_out, k1, k2) * 3.0
    weight = d.delta_weight(None)
    torch.testing.assert_close(weight, expected)
    # Multilinear rank: each kernel mode has rank kernel_r = 1, the channel modes rank ≤ r = 2.
    for mode, bound in ((0, 2), (1, 2), (2, 1), (3, 1)):
        unfolded = weight.detach().movedim(mode, 0).reshape(weight.shape[mode], -1)
        assert torch.linalg.matrix_rank(unfolded) <= bound


def test_linear_update_is_u_out_g_u_in():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("flora", r=3, targets=["lin1"]))
    perturb(model, "default", seed=1)
    d = delta_of(model, "lin1")
    torch.testing.assert_close(d.delta_weight(None), d.flora_out @ d.flora_core.t() @ d.flora_in.t())


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("flora")  # r = 8: core 8² plus U_in, U_out of 576·8
    assert deltatune.get_method("flora").delta.num_parameters(cfg, LAYER_576, "x") == 64 + 2 * 576 * 8 == 9280


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="kernel_r"):
        deltatune.config("flora", kernel_r=0)
