"""Sparse fine-tuning: ΔW has exactly k non-zeros at the chosen indices, for each selection strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
import deltatune.methods.sparse_ft  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.core.slot import Host

from toys import make, perturb


def _attach(model, path="0", name="default", **fields):
    deltatune.attach(model, deltatune.config("sparse_ft", targets=[path], **fields), name=name)
    perturb(model, name, seed=0)
    module = model.get_submodule(path)
    delta = module.deltatune[name]
    return module, delta, delta.delta_weight(Host(module, module.deltatune))


def test_random_selection_has_exactly_k_nonzeros_at_the_indices():
    model = nn.Sequential(nn.Linear(576, 576))
    _, delta, dw = _attach(model, density=0.01, seed=5)
    k = round(0.01 * 576 * 576)
    assert delta.sparse_values.numel() == k == sum(p.numel() for p in deltatune.trainable_parameters(model))
    flat = dw.reshape(-1)
    assert torch.count_nonzero(flat) == k
    assert torch.equal(flat.nonzero().flatten(), delta.sparse_indices)
    torch.testing.assert_close(flat[delta.sparse_indices], delta.sparse_values)
    x = torch.randn(2, 576)  # k > out: the dense path
    torch.testing.assert_close(model(x), F.linear(x, model[0].weight + dw, model[0].bias), atol=1e-5, rtol=1e-5)


def test_random_selection_is_reproducible_from_the_seed_and_differs_per_layer():
    def indices(seed, path):
        model = nn.ModuleDict({"a": nn.Linear(40, 30), "b": nn.Linear(40, 30)})
        deltatune.attach(model, deltatune.config("sparse_ft", targets=["a", "b"], k=50, seed=seed))
        return model[path].deltatune["default"].sparse_indices

    assert torch.equal(indices(1, "a"), indices(1, "a"))
    assert not torch.equal(indices(1, "a"), indices(2, "a"))
    assert not torch.equal(indices(1, "a"), indices(1, "b"))


def test_magnitude_selection_picks_the_largest_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    module, delta, dw = _attach(model, selection="magnitude", k=20)
    matrix = to_matrix(delta.info, module.weight.detach()).abs().reshape(-1)
    assert set(delta.sparse_indices.tolist()) == set(matrix.topk(20).indices.tolist())
    assert torch.count_nonzero(dw) == 20


def test_mask_selection_uses_the_given_positions_and_forward_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8))
    positions = [0, 11, 42, 79]
    module, delta, dw = _attach(model, selection="mask", indices={"0": positions})
    assert delta.sparse_indices.tolist() == positions
    assert dw.reshape(-1).nonzero().flatten().tolist() == positions
    x = torch.randn(3, 5, 10)  # k <= out: the gathered path over the k entries only
    torch.testing.assert_close(model(x), F.linear(x, module.weight + dw, module.bias))


@pytest.mark.parametrize("fields,message", [
    ({"density": 0.0}, "density must be in"),
    ({"k": 0}, "k must be > 0"),
    ({"selection": "mask"}, "selection='mask' needs indices"),
    ({"selection": "mask", "indices": {"0": [1]}, "k": 3}, "k=3 has no effect"),
    ({"indices": {"0": [1]}}, "indices are only used with selection='mask'"),
    ({"selection": "mask", "indices": {"0": [3, 3]}}, r"indices\['0'\] must be distinct"),
])
def test_bad_config_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("sparse_ft", **fields)


def test_bad_layer_fits():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no entry for module 'lin1'"):
        deltatune.attach(model, deltatune.config("sparse_ft", targets=["lin0", "lin1"], selection="mask",
                                                 indices={"lin0": [1]}))
    with pytest.raises(DeltatuneError, match="outside its 20×10 matrix view"):
        deltatune.attach(model, deltatune.config("sparse_ft", targets=["lin0"], selection="mask",
                                                 indices={"lin0": [200]}))
    with pytest.raises(DeltatuneError, match="only 60"):
        deltatune.attach(model, deltatune.config("sparse_ft", targets=["lin2"], k=61))
