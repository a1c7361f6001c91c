"""LoRI: frozen random A regenerated from the seed, B trained only where its fixed mask allows."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import Host
from deltatune.methods.lori import calibrate_masks

from toys import make, perturb, run


def _linear(name="default", model=None, **fields):
    torch.manual_seed(0)
    model = model if model is not None else nn.Sequential(nn.Linear(40, 30))
    deltatune.attach(model, deltatune.config("lori", targets=["0"], **fields), name=name)
    return model, model[0].deltatune[name], Host(model[0], model[0].deltatune)


def test_update_is_scaled_masked_b_times_frozen_a():
    model, delta, host = _linear(r=4, alpha=8, sparsity=0.75)
    with torch.no_grad():
        delta.lora_B_values.normal_()
    dense = torch.zeros(30, 4)
    dense[delta.lora_B_mask] = delta.lora_B_values.detach()
    assert int(delta.lora_B_mask.sum()) == 30 == delta.lora_B_values.numel()  # 25% of 30·4 entries
    torch.testing.assert_close(delta.delta_weight(host), 2.0 * dense @ delta.lora_A)
    assert [n for n, _ in deltatune.named_trainable_parameters(model)] == ["0.deltatune.default.lora_B_values"]


def test_a_is_a_frozen_kaiming_projection_regenerated_from_the_seed(tmp_path):
    model, delta, _ = _linear(r=8, seed=3)
    bound = 1 / math.sqrt(40)
    assert delta.lora_A.abs().max() <= bound and delta.lora_A.abs().max() > 0.9 * bound
    _, again, _ = _linear(r=8, seed=3)
    _, other, _ = _linear(r=8, seed=4)
    assert torch.equal(delta.lora_A, again.lora_A) and not torch.equal(delta.lora_A, other.lora_A)
    assert "lora_A" not in dict(delta.named_parameters())
    before = delta.lora_A.clone()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.5)
    model(torch.randn(4, 40)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(delta.lora_A, before)
    deltatune.save(model, tmp_path / "a")
    assert {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "a" / "adapter_model.safetensors")} == {
        "lora_B_values", "lora_B_mask"}


def test_different_seeds_give_nearly_orthogonal_projections():
    _, one, _ = _linear(model=nn.Sequential(nn.Linear(4096, 8)), r=8, seed=1)
    _, two, _ = _linear(model=nn.Sequential(nn.Linear(4096, 8)), r=8, seed=2)
    a1, a2 = (d.lora_A / d.lora_A.norm(dim=1, keepdim=True) for d in (one, two))
    assert (a1 @ a2.t()).abs().max() < 0.1


def test_parameter_count_on_a_576_layer_is_the_kept_share_of_b():
    model = nn.Sequential(nn.Linear(576, 576))
    deltatune.attach(model, deltatune.config("lori", r=16, sparsity=0.9, targets=["0"]))
    kept = round(0.1 * 576 * 16)  # 922: 95% fewer than LoRA's 2·576·16
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == kept
    spec = deltatune.get_method("lori")
    assert spec.delta.num_parameters(deltatune.adapters(model)["default"], model[0].deltatune.info, "0") == kept
    assert kept / (2 * 576 * 16) < 0.05 + 1e-3


def test_identity_at_init():
    model, x = make("gpt2")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("lori", r=4, targets=["c_attn", "c_fc"]))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


def test_calibrated_mask_keeps_the_largest_dense_entries_and_survives_save_load(tmp_path):
    model, dense, _ = _linear(name="dense", r=4, sparsity=0.0, seed=7)
    _, sparse, host = _linear(name="sparse", model=model, r=4, sparsity=0.9, seed=7)
    with torch.no_grad():
        dense.lora_B_values.normal_()
        sparse.lora_B_values.fill_(1.0)
    calibrate_masks(model, "sparse", "dense")
    kept = sparse.lora_B_values.numel()
    expected = torch.zeros(30 * 4, dtype=torch.bool)
    expected[dense.lora_B_values.detach().abs().topk(kept).indices] = True
    assert torch.equal(sparse.lora_B_mask.flatten(), expected)
    assert sparse.lora_B_values.abs().sum() == 0  # LoRI-S restarts B from zero under the new mask
    with torch.no_grad():
        sparse.lora_B_values.normal_()
    deltatune.save(model, tmp_path / "s", name="sparse")
    fresh, _, _ = _linear(name="dense", r=4, sparsity=0.0, seed=7)
    deltatune.load(fresh, tmp_path / "s", name="sparse")
    loaded = fresh[0].deltatune["sparse"]
    assert torch.equal(loaded.lora_B_mask, sparse.lora_B_mask)
    torch.testing.assert_close(loaded.delta_weight(host), sparse.delta_weight(host))


def test_calibration_needs_a_dense_adapter_with_the_same_projection():
    model, _, _ = _linear(name="dense", r=4, sparsity=0.0, seed=1)
    _linear(name="sparse", model=model, r=4, sparsity=0.9, seed=2)
    with pytest.raises(DeltatuneError, match="same r and seed"):
        calibrate_masks(model, "sparse", "dense")


def test_a_file_whose_mask_disagrees_with_its_values_is_refused(tmp_path):
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("lori", r=2, sparsity=0.5, targets=["lin0"]))
    perturb(model, "default", 0)
    deltatune.save(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lin0.lora_B_mask"] = torch.ones(20, 2, dtype=torch.bool)
    save_file(tensors, path, metadata={"format": "pt"})
    fresh, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="keeps 40 entries but its values hold 20"):
        deltatune.load(fresh, tmp_path / "a")


@pytest.mark.parametrize("fields,field", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                          ({"r": -1}, "r")])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("lori", **fields)
