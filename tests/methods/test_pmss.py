"""PMSS: a frozen skeleton (columns and rows of the pretrained weight) around a trainable r × r core."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import Host
from deltatune.methods.pmss import pivoted_columns

from toys import make, perturb, run


def _linear(r=4, width_in=24, width_out=18):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width_in, width_out))
    deltatune.attach(model, deltatune.config("pmss", r=r, targets=["0"]))
    return model, model[0].deltatune["default"], Host(model[0], model[0].deltatune)


def test_skeleton_is_made_of_columns_and_rows_of_the_pretrained_weight():
    model, delta, _ = _linear(r=4)
    w = model[0].weight.detach()
    assert torch.equal(delta.skeleton_C, w[:, delta.column_index])
    assert torch.equal(delta.skeleton_R, w[delta.row_index])
    assert len(set(delta.column_index.tolist())) == 4 and len(set(delta.row_index.tolist())) == 4
    assert [n for n, _ in deltatune.named_trainable_parameters(model)] == ["0.deltatune.default.core"]


def test_pivoted_selection_takes_columns_by_largest_residual_norm():
    # orthogonal columns of distinct norms: pivoting takes them largest first
    q, _ = torch.linalg.qr(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)))
    norms = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 0.5])
    assert pivoted_columns(q * norms, 3).tolist() == [1, 3, 4]
    # on a rank-3 matrix, three pivoted columns span its whole column space
    low = torch.randn(12, 3, dtype=torch.float64) @ torch.randn(3, 9, dtype=torch.float64)
    c = low[:, pivoted_columns(low, 3)]
    torch.testing.assert_close(c @ torch.linalg.pinv(c) @ low, low)


def test_core_starts_at_the_least_squares_core_so_the_model_is_unchanged():
    model, delta, host = _linear(r=4)
    w = model[0].weight.detach()
    c, r = delta.skeleton_C, delta.skeleton_R
    torch.testing.assert_close(delta.core.detach(), torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r))
    assert torch.equal(delta.core.detach(), delta.core_init)
    assert delta.delta_weight(host).abs().max() == 0
    model_toy, x = make("llama")
    base = run(model_toy, x)
    deltatune.attach(model_toy, deltatune.config("pmss", r=3, targets=["q_proj", "down_proj", "embed_tokens"]))
    torch.testing.assert_close(run(model_toy, x), base, atol=0, rtol=0)


def test_update_is_c_times_core_change_times_r_and_the_skeleton_stays_frozen():
    model, delta, host = _linear(r=3)
    frozen = {n: b.clone() for n, b in delta.named_buffers()}
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    model(torch.randn(5, 24)).pow(2).sum().backward()
    opt.step()
    assert all(torch.equal(b, frozen[n]) for n, b in delta.named_buffers())
    change = delta.core.detach() - delta.core_init
    assert change.abs().max() > 0
    torch.testing.assert_close(delta.delta_weight(host), delta.skeleton_C @ change @ delta.skeleton_R)
    assert torch.linalg.matrix_rank(delta.delta_weight(host)).item() <= 3


def test_parameter_count_is_r_squared_for_a_576_layer():
    model = nn.Sequential(nn.Linear(576, 576))
    deltatune.attach(model, deltatune.config("pmss", r=32, targets=["0"]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 32**2
    spec = deltatune.get_method("pmss")
    assert spec.delta.num_parameters(deltatune.adapters(model)["default"], model[0].deltatune.info, "0") == 1024


def test_saved_indices_are_the_source_of_truth_on_load(tmp_path):
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("pmss", r=2, targets=["lin0", "lin1"]))
    perturb(model, "default", 0)
    deltatune.save(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"core", "column_index", "row_index"}
    tensors["base_model.model.lin1.column_index"] = torch.tensor([7, 11])  # another valid skeleton
    save_file(tensors, path, metadata={"format": "pt"})
    fresh, _ = make("mlp")
    deltatune.load(fresh, tmp_path / "a")
    delta = fresh.lin1.deltatune["default"]
    assert delta.column_index.tolist() == [7, 11]
    assert torch.equal(delta.skeleton_C, fresh.lin1.weight.detach()[:, [7, 11]])
    torch.testing.assert_close(delta.core_init, torch.linalg.pinv(delta.skeleton_C) @ fresh.lin1.weight.detach()
                               @ torch.linalg.pinv(delta.skeleton_R))


def test_rank_above_the_layer_size_is_refused_and_bad_r_names_the_field():
    with pytest.raises(DeltatuneError, match="rank 20 exceeds 18"):
        _linear(r=20)
    with pytest.raises(DeltatuneError, match=r"\br must be > 0"):
        deltatune.config("pmss", r=0)
