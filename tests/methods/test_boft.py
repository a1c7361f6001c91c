"""BOFT: the butterfly product is orthogonal and dense over b·2^(m−1) coordinates, the update is diag(s)·W·Bᵀ − W,
identity at init, training-time block dropout, parameter count, bad shapes, PEFT parity (m = 1 as PEFT runs on CPU,
and m > 1 with PEFT's CUDA block-diagonal kernel replaced by plain torch)."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.boft  # noqa: F401
from deltatune import DeltatuneError
from deltatune.methods.boft import BoftDelta, butterfly_permutation
from test_oft import (LAYER_576, attach_linear, deltatune_saved_loads_in_peft, peft,
                      peft_saved_loads_in_deltatune)


def _linear_boft(**fields):
    return attach_linear("boft", 16, 8, **fields)


def test_butterfly_is_orthogonal_and_mixes_groups_of_b_times_2_to_the_m_minus_1():
    model, delta, host = _linear_boft(block_size=2, n_butterfly_factor=3, init="random")
    butterfly = delta.butterfly().detach()
    torch.testing.assert_close(butterfly.t() @ butterfly, torch.eye(16), atol=1e-5, rtol=0)
    nonzero = butterfly.abs() > 1e-7
    groups = torch.block_diag(*[torch.ones(8, 8)] * 2).bool()  # b·2^(m−1) = 8
    assert not (nonzero & ~groups).any() and nonzero[groups].all()
    weight = model[0].weight.detach()
    expected = delta.boft_s.detach().unsqueeze(1) * (weight @ butterfly.t()) - weight
    torch.testing.assert_close(delta.delta_weight(host), expected, atol=1e-6, rtol=0)


def test_one_factor_is_block_diagonal_oft_with_a_scale():
    _, delta, _ = _linear_boft(block_size=4, init="random")
    butterfly = delta.butterfly().detach()
    blocks = torch.block_diag(*[torch.ones(4, 4)] * 4).bool()
    assert (butterfly[~blocks] == 0).all()


def test_butterfly_permutation_interleaves_half_blocks():
    # b = 4, second factor: groups of 8, half-blocks of 2 -> chunks 0, 2, 1, 3
    assert butterfly_permutation(8, 8, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert butterfly_permutation(8, 4, 2).tolist() == list(range(8))


def test_identity_at_init_and_dropout_only_while_training():
    model, delta, host = _linear_boft(block_size=4, dropout=0.5)
    assert delta.delta_weight(host).abs().max() == 0
    with torch.no_grad():
        delta.boft_R.normal_(std=0.3)
    x = torch.randn(3, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    torch.manual_seed(1)
    blocks = delta.factor_blocks(dropout=True)
    identity = [torch.equal(b, torch.eye(4)) for b in blocks[0]]
    assert sum(identity) == 2  # int(0.5 · 4) blocks of the (only) factor


def test_parameter_count():
    cfg = deltatune.config("boft", block_size=8, n_butterfly_factor=2)
    # PEFT's layout stores m·n full b×b matrices (the paper's free entries are their m·n·b(b−1)/2 skew parts) + s
    assert BoftDelta.num_parameters(cfg, LAYER_576, "l") == 2 * 72 * 8 * 8 + 576


@pytest.mark.parametrize("fields,match", [
    ({"block_size": 0, "block_num": 0}, "block_size"), ({"block_size": 4, "block_num": 2}, "block_num"),
    ({"n_butterfly_factor": 0}, "n_butterfly_factor"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(DeltatuneError, match=match):
        deltatune.config("boft", **fields)


@pytest.mark.parametrize("fields,match", [({"block_size": 3}, "block_size=3 does not divide the 16"),
                                          ({"block_size": 4, "n_butterfly_factor": 4}, "butterfly factors")])
def test_layer_that_does_not_fit_is_refused(fields, match):
    with pytest.raises(DeltatuneError, match=match):
        _linear_boft(**fields)


@pytest.fixture
def peft_butterfly_kernel(monkeypatch):
    """Let PEFT build m > 1 butterflies on CPU: its CUDA block-diagonal kernel replaced by torch.block_diag."""
    from peft.tuners.boft import layer

    class TorchBlockDiag:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*factor) for factor in blocks])

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(layer, "FastBlockDiag", TorchBlockDiag)


PEFT_TOYS = {"llama": ["q_proj", "v_proj", "down_proj"], "conv": ["conv2d", "head"]}


@pytest.mark.parametrize("toy", PEFT_TOYS)
def test_peft_saved_boft_loads_with_peft_logits(toy, tmp_path):
    size = {"llama": 4, "conv": 0}[toy]
    blocks = {"llama": 0, "conv": 1}[toy]
    cfg = peft.BOFTConfig(boft_block_size=size, boft_block_num=blocks, target_modules=PEFT_TOYS[toy],
                          init_weights=False)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path)


@pytest.mark.parametrize("toy", PEFT_TOYS)
def test_deltatune_saved_boft_loads_in_peft(toy, tmp_path):
    fields = {"llama": {"block_size": 4}, "conv": {"block_size": 0, "block_num": 1}}[toy]
    deltatune_saved_loads_in_peft(deltatune.config("boft", targets=PEFT_TOYS[toy], **fields), toy, tmp_path)


def test_peft_butterfly_with_two_factors_round_trips(peft_butterfly_kernel, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=targets, init_weights=False)
    peft_saved_loads_in_deltatune(cfg, "llama", tmp_path / "a")
    fields = {"targets": targets, "block_size": 4, "n_butterfly_factor": 2}
    deltatune_saved_loads_in_peft(deltatune.config("boft", **fields), "llama", tmp_path / "b")
