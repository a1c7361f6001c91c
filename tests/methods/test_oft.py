"""OFT: orthogonal block rotation (exact Cayley), hyperspherical energy kept, COFT radius, block sharing, PEFT's
block-size rule, the paper's parameter count, PEFT parity.

Also holds the helpers the other orthogonal-family tests (BOFT, HRA, ...) share.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import deltatune
import deltatune.methods.oft  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import HostInfo
from deltatune.core.slot import Host
from deltatune.methods.oft import OftDelta, cayley, cayley_neumann, skew_symmetric

import peft_roundtrip as roundtrip
from peft_roundtrip import peft
from toys import make

LAYER_576 = HostInfo("linear", 576, 576, (), (576, 576), True, -1)


def delta_and_host(model: nn.Module, path: str, name: str = "default"):
    module = model.get_submodule(path)
    return module.deltatune[name], Host(module, module.deltatune)


# The orthogonal family's round trips use small perturbations: rotations stay near the identity (and inside COFT's
# radius, which PEFT projects onto before saving).
peft_saved_loads_in_deltatune = partial(roundtrip.peft_saved_loads_in_deltatune, scale=0.05)
deltatune_saved_loads_in_peft = partial(roundtrip.deltatune_saved_loads_in_peft, scale=0.05)


def attach_linear(method: str, in_features: int, out_features: int, **fields):
    """(model, delta, host) for `method` on a seeded one-layer nn.Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    deltatune.attach(model, deltatune.config(method, targets=["0"], **fields))
    return model, *delta_and_host(model, "0")


def _linear_oft(**fields):
    return attach_linear("oft", 16, 12, **fields)


def test_rotation_is_orthogonal_block_diagonal_and_acts_on_the_input_side():
    model, delta, host = _linear_oft(block_size=4, init="random")
    blocks = delta.rotation_blocks().detach()
    eye = torch.eye(4).expand(4, 4, 4)
    torch.testing.assert_close(blocks.transpose(1, 2) @ blocks, eye, atol=1e-5, rtol=0)
    rotation = torch.block_diag(*blocks)
    weight = model[0].weight.detach()
    torch.testing.assert_close(delta.delta_weight(host), weight @ rotation.t() - weight, atol=1e-6, rtol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), nn.functional.linear(x @ rotation, weight, model[0].bias), atol=1e-5, rtol=0)


def test_identity_at_init_and_hyperspherical_energy_is_kept():
    model, delta, host = _linear_oft(block_size=8)
    assert delta.delta_weight(host).abs().max() == 0
    with torch.no_grad():
        delta.skew.normal_(std=0.5)
    weight = model[0].weight.detach().clone()
    deltatune.merge(model)
    merged = model[0].weight.detach()
    # rotating the input space keeps every neuron's norm and every pairwise angle: W'W'ᵀ = WWᵀ
    torch.testing.assert_close(merged @ merged.t(), weight @ weight.t(), atol=1e-5, rtol=0)
    assert (merged - weight).abs().max() > 1e-2


def test_neumann_series_approximates_the_transposed_cayley_transform():
    skew = skew_symmetric(torch.randn(3, 6) * 0.01, 4)  # the series is exact up to O(Q⁴)
    approx = cayley_neumann(skew, 5)
    torch.testing.assert_close(approx, cayley(skew).transpose(1, 2), atol=1e-5, rtol=0)  # PEFT's convention
    torch.testing.assert_close(approx.transpose(1, 2) @ approx, torch.eye(4).expand(3, 4, 4), atol=1e-5, rtol=0)
    assert torch.equal(cayley_neumann(skew, 1), torch.eye(4).expand(3, 4, 4))


def test_coft_projects_the_parameter_during_training_only():
    model, delta, host = _linear_oft(block_size=4, coft=True, eps=0.1)
    bound = 0.1 / 4**0.5  # eps / √(stored blocks), on ‖Q‖_F = √2·‖free entries‖
    with torch.no_grad():
        delta.skew.normal_(std=1.0)
    raw = delta.skew.detach().clone()
    x = torch.randn(2, 16)
    model.eval()
    out_eval = model(x)
    assert torch.equal(delta.skew, raw), "an eval forward must not move the parameter"
    model.train()
    out_train = model(x)
    projected = raw * (bound / (2**0.5 * raw.norm(dim=1, keepdim=True)))
    torch.testing.assert_close(delta.skew.detach(), projected)
    torch.testing.assert_close(out_train, out_eval)  # the projection changes the parameter, not the output
    out_train.sum().backward()
    assert delta.skew.grad is not None and delta.skew.grad.abs().sum() > 0


def test_block_share_stores_one_block():
    model, delta, host = _linear_oft(block_size=4, block_share=True, init="random")
    assert delta.skew.shape == (1, 6)
    blocks = delta.rotation_blocks()
    assert blocks.shape == (4, 4, 4) and all(torch.equal(blocks[0], b) for b in blocks)


def test_block_size_moves_to_the_nearest_divisor_like_peft():
    with pytest.warns(UserWarning, match="block_size=4 does not divide 10"):
        model = nn.Sequential(nn.Linear(10, 3))
        deltatune.attach(model, deltatune.config("oft", targets=["0"], block_size=4))
    assert model[0].deltatune["default"].block_size == 5  # divisors 2 and 5 are 2 and 1 away
    with pytest.warns(UserWarning, match="r=4 does not divide 18"):
        model = nn.Sequential(nn.Linear(18, 3))
        deltatune.attach(model, deltatune.config("oft", targets=["0"], r=4, block_size=0))
    assert model[0].deltatune["default"].n_blocks == 3  # 3 and 6 are both one away: the smaller wins


def test_parameter_count_matches_the_paper():
    cfg = deltatune.config("oft", block_size=32)
    assert OftDelta.num_parameters(cfg, LAYER_576, "l") == 18 * 32 * 31 // 2  # r blocks × b(b−1)/2
    assert OftDelta.num_parameters(cfg.replace(r=4, block_size=0), LAYER_576, "l") == 4 * 144 * 143 // 2
    assert OftDelta.num_parameters(cfg.replace(block_share=True), LAYER_576, "l") == 32 * 31 // 2


@pytest.mark.parametrize("fields,match", [({"r": 0, "block_size": 0}, "block_size"), ({"r": 4, "block_size": 8}, "r="),
                                          ({"eps": 0.0}, "eps"), ({"neumann_terms": 0}, "neumann_terms")])
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(DeltatuneError, match=match):
        deltatune.config("oft", **fields)


def test_peft_bias_training_is_refused(tmp_path):
    model, _ = make("mlp")
    peft.get_peft_model(model, peft.OFTConfig(oft_block_size=5, target_modules=["lin0"], bias="oft_only")
                        ).save_pretrained(tmp_path / "p")
    with pytest.raises(DeltatuneError, match="bias='oft_only'"):
        deltatune.load(make("mlp")[0], tmp_path / "p")


PEFT_VARIANTS = [
    ("cayley", {"use_cayley_neumann": False}, {"cayley_neumann": False}),
    ("neumann", {"use_cayley_neumann": True}, {"cayley_neumann": True}),
    ("share", {"use_cayley_neumann": False, "block_share": True}, {"block_share": True}),
    ("coft", {"use_cayley_neumann": False, "coft": True, "eps": 0.05}, {"coft": True, "eps": 0.05}),
]
PEFT_TOYS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "mlp": ["lin0", "lin1", "lin2"],
             "conv": ["conv2d", "head"]}  # PEFT's unmerged Conv2d forward is not its merged form: compare merged
CASES = [pytest.param(v, toy, id=f"{v[0]}-{toy}") for v in PEFT_VARIANTS for toy in PEFT_TOYS]


@pytest.mark.parametrize("variant,toy", CASES)
def test_peft_saved_oft_loads_with_peft_logits(variant, toy, tmp_path):
    _, theirs, _ = variant
    cfg = peft.OFTConfig(r=0, oft_block_size=4, target_modules=PEFT_TOYS[toy], init_weights=False, **theirs)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path, merged=toy == "conv")


@pytest.mark.parametrize("variant,toy", CASES)
def test_deltatune_saved_oft_loads_in_peft(variant, toy, tmp_path):
    _, _, ours = variant
    fields = {"block_size": 4, "targets": PEFT_TOYS[toy], **ours}
    deltatune_saved_loads_in_peft(deltatune.config("oft", **fields), toy, tmp_path, merged=toy == "conv")
