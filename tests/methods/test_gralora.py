"""GraLoRA: a k×k grid of independent rank-r/k blocks (plus an optional global LoRA); PEFT parity both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.methods import gralora  # noqa: F401

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from test_hira import layer_count, linear


def block(delta, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_ij (out/k, r/k), A_ij (r/k, in/k)) read from PEFT's layout, as the module docstring describes."""
    q = delta.r // delta.k
    a_ij = delta.gralora_A[j][:, i * q:(i + 1) * q].t()
    b_ij = delta.gralora_B[i][j * q:(j + 1) * q, :].t()
    return b_ij, a_ij


def test_update_is_a_grid_of_independent_low_rank_blocks():
    _, delta, host = linear("gralora", out=12, inp=16, r=4, k=2, alpha=8, init="random")
    update = delta.delta_weight(host).detach()
    m, n = 12 // 2, 16 // 2
    for i in range(2):
        for j in range(2):
            b_ij, a_ij = block(delta, i, j)
            blk = update[i * m:(i + 1) * m, j * n:(j + 1) * n]
            torch.testing.assert_close(blk, delta.scaling * b_ij @ a_ij)
            assert torch.linalg.matrix_rank(blk).item() == 4 // 2
    assert torch.linalg.matrix_rank(update).item() == 2 * 4  # k·r, where LoRA at rank r stops at r


def test_a_block_only_sees_its_own_input_channels():
    model, delta, _ = linear("gralora", out=12, inp=16, r=4, k=2, init="random")
    x = torch.randn(3, 16)
    x[:, 8:] = 0  # only input block j = 0 is active
    model(x).pow(2).sum().backward()
    assert delta.gralora_A.grad[0].abs().sum() > 0
    assert delta.gralora_A.grad[1].abs().sum() == 0


def test_forward_and_gathered_factors_match_the_dense_update():
    model, delta, host = linear("gralora", out=12, inp=16, r=4, k=2, hybrid_r=3, init="random")
    update = delta.delta_weight(host)
    down, up = delta.factors(host)
    assert down.shape == (2 * 4 + 3, 16)
    torch.testing.assert_close(up @ down, update)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), x @ (model[0].weight + update).t() + model[0].bias)


def test_parameter_count_is_loras_whatever_k():
    assert layer_count("gralora", r=8, k=2) == layer_count("gralora", r=8, k=4) == 8 * (576 + 576)
    assert layer_count("gralora", r=8, k=2, hybrid_r=4) == 12 * (576 + 576)


PEFT_CASES = {
    "llama": (["q_proj", "v_proj", "down_proj"], {"r": 4, "alpha": 8, "gralora_k": 2}),
    "gpt2": (["c_attn", "c_proj", "c_fc"], {"r": 4, "alpha": 8, "gralora_k": 2, "hybrid_r": 2}),
}


@pytest.mark.parametrize("toy", sorted(PEFT_CASES))
def test_peft_saved_gralora_loads_in_deltatune(toy, tmp_path):
    targets, fields = PEFT_CASES[toy]
    peft_saved_loads_in_deltatune(peft.GraloraConfig(target_modules=targets, init_weights=False, **fields), toy,
                                  tmp_path)


@pytest.mark.parametrize("toy", sorted(PEFT_CASES))
def test_deltatune_saved_gralora_loads_in_peft(toy, tmp_path):
    targets, fields = PEFT_CASES[toy]
    ours = deltatune.config("gralora", targets=targets, r=fields["r"], alpha=fields["alpha"], k=fields["gralora_k"],
                            hybrid_r=fields.get("hybrid_r", 0))
    deltatune_saved_loads_in_peft(ours, toy, tmp_path)


def test_bad_k_names_the_field_and_the_module():
    with pytest.raises(DeltatuneError, match=r"gralora: k=3 must be > 0 and divide r=4"):
        deltatune.config("gralora", r=4, k=3)
    with pytest.raises(DeltatuneError, match=r"k=2 must divide in_features=16 and out_features=3 of '0'.*k_pattern"):
        linear("gralora", out=3, inp=16, r=4, k=2)


def test_peft_bias_is_refused():
    with pytest.raises(DeltatuneError, match="PEFT GraLoRA bias='all' is not supported"):
        gralora.PEFT.from_peft({"r": 4, "bias": "all"})
