"""SparseAdapter: fixed masks keep 1 − sparsity of each projection, masked weights never act, SNIP re-pruning keeps
the largest |g ⊙ w|, masks are saved and reloaded, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import delta_at
from toys import make, perturb, run, save_and_reload

import deltatune
from deltatune import DeltatuneError
from deltatune.methods.sparse_adapter import snip_prune


def test_masks_keep_the_requested_fraction_and_masked_weights_never_act():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("sparse_adapter", r=4, sparsity=0.75))
    delta = delta_at(model, "model.layers.0.mlp.down_proj")
    assert delta.down_mask.sum() == 16 and delta.up_mask.sum() == 16  # 25 % of 4 × 16
    down, _, up, _ = delta.projections()
    assert (down[delta.down_mask == 0] == 0).all() and (up[delta.up_mask == 0] == 0).all()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    before = delta.down.detach().clone()
    model(x).logits.pow(2).mean().backward()
    opt.step()
    moved = delta.down.detach() != before
    assert moved.any() and not moved[delta.down_mask == 0].any()


def test_masks_differ_per_layer_and_reload_with_the_adapter(tmp_path):
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("sparse_adapter", r=4, sparsity=0.5))
    perturb(model, "default", seed=0)
    masks = [delta_at(model, f"model.layers.{i}.mlp.down_proj").down_mask for i in range(2)]
    assert not torch.equal(*masks)
    tensors, fresh = save_and_reload(model, "llama", tmp_path, atol=1e-6)
    assert torch.equal(tensors["base_model.model.model.layers.0.mlp.down_proj.down_mask"], masks[0])
    assert torch.equal(delta_at(fresh, "model.layers.0.mlp.down_proj").down_mask, masks[0])


def test_snip_keeps_the_weights_with_the_largest_gradient_times_weight():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("sparse_adapter", r=4, sparsity=0.5))
    delta = delta_at(model, "model.layers.1.mlp.down_proj")
    loss_fn = lambda: model(x).logits.pow(2).mean()
    with torch.no_grad():
        delta.down_mask.fill_(1.0)
        delta.up_mask.fill_(1.0)
    grad = torch.autograd.grad(loss_fn(), delta.down)[0]
    scores = (grad * delta.down).abs().flatten()
    snip_prune(model, loss_fn)
    kept = delta.down_mask.flatten().bool()
    assert kept.sum() == 32 and scores[kept].min() >= scores[~kept].max()


def test_bad_input_is_one_clear_error():
    with pytest.raises(DeltatuneError, match="sparsity must be in"):
        deltatune.config("sparse_adapter", sparsity=1.0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no sparse_adapter named 'default'"):
        deltatune.attach(model, deltatune.config("lora", r=2, targets=["lin1"]))
        snip_prune(model, lambda: run(model, torch.zeros(1, 10)).sum())
