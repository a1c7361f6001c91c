"""LoRMA: multiplicative updates W' = (I + s·BA)·W0 and W' = s·I_π(BA)·W0, identity at init."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.methods.lorma import cyclic_row_shift

from test_hira import attached, layer_count, linear
from toys import make, run


@pytest.mark.parametrize("toy,path", [("mlp", "lin0"), ("conv", "conv2d"), ("emb", "emb"),
                                      ("gpt2", "transformer.h.0.mlp.c_fc")])
def test_plus_merges_to_identity_plus_low_rank_times_w(toy, path):
    model, x = make(toy)
    module, delta, host = attached(model, path, "lorma", r=2, alpha=4)
    w0 = to_matrix(delta.info, module.weight.detach().clone())
    transform = torch.eye(delta.info.out_features) + 2.0 * delta.lorma_B @ delta.lorma_A
    adapted = run(model, x)
    deltatune.merge(model)
    torch.testing.assert_close(to_matrix(delta.info, module.weight.detach()), transform @ w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(to_matrix(delta.info, delta.delta_weight(host))).item() <= 2


def test_pi_is_the_shifted_product_times_w_and_identity_at_init():
    model, delta, host = linear("lorma", out=6, inp=5, r=2, alpha=4, variant="pi", seed=None)
    product = delta.scaling * delta.lorma_B @ delta.lorma_A
    torch.testing.assert_close(cyclic_row_shift(product), torch.eye(6))
    assert delta.delta_weight(host).abs().max() < 1e-6
    model, delta, host = linear("lorma", out=6, inp=5, r=2, alpha=4, variant="pi")
    w0 = model[0].weight.detach()
    expected = delta.scaling * cyclic_row_shift(delta.lorma_B @ delta.lorma_A) @ w0
    torch.testing.assert_close(delta.delta_weight(host) + w0, expected)


def test_cyclic_shift_inflates_rank():
    assert torch.equal(cyclic_row_shift(torch.arange(9.0).reshape(3, 3)),
                       torch.tensor([[0.0, 1, 2], [5, 3, 4], [7, 8, 6]]))
    rank_one = torch.randn(8, 1) @ torch.randn(1, 8)
    assert torch.linalg.matrix_rank(cyclic_row_shift(rank_one)).item() == 8


def test_plus_is_computed_from_the_base_output():
    """LoRMA₊ re-ordered: y = W0x + b + s·B(A(W0x)), no out × in product formed."""
    model, delta, _ = linear("lorma", out=6, inp=5, r=2, alpha=3)
    x = torch.randn(3, 5)
    with deltatune.use(model, None):
        plain = model(x)
    base = x @ model[0].weight.detach().t()
    expected = plain + 1.5 * (base @ delta.lorma_A.t()) @ delta.lorma_B.t()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_parameter_count_on_a_576x576_layer():
    assert layer_count("lorma", r=8) == layer_count("lorma", r=8, variant="pi") == 2 * 8 * 576


def test_bad_values_name_the_field():
    with pytest.raises(DeltatuneError, match="lorma.variant must be 'plus' | 'pi'"):
        deltatune.config("lorma", variant="times")
    with pytest.raises(DeltatuneError, match="lorma: alpha must be non-zero"):
        deltatune.config("lorma", alpha=0)
