"""HyperFormer: one hypernetwork generates every layer's adapter from task and layer embeddings; tasks are adapters
that share the first task's hypernetwork (`hypernetwork_from`). Sharing, mixed-task batches, save / load, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import delta_at, module_host_contract
from toys import assert_per_sample_matches_alone, make, perturb, run

import deltatune
import deltatune.methods.hyperformer
from deltatune import DeltatuneError
from deltatune.core.api import shared_of

SMALL = {"r": 2, "task_dim": 4, "layer_dim": 3, "projected_dim": 5}


def two_tasks(toy: str = "llama"):
    model, x = make(toy)
    torch.manual_seed(0)
    deltatune.attach(model, deltatune.config("hyperformer", **SMALL), name="sst2")
    deltatune.attach(model, deltatune.config("hyperformer", hypernetwork_from="sst2", **SMALL), name="mnli")
    perturb(model, "sst2", seed=0)  # perturbs the hypernetwork and sst2's task embedding
    perturb(model, "mnli", seed=1)
    return model, x


def test_two_tasks_share_the_hypernetwork_parameters():
    model, x = two_tasks()
    first, second = shared_of(model, "sst2"), shared_of(model, "mnli")
    assert first.hypernet is second.hypernet and first.task_embedding is not second.task_embedding
    hypernet = {id(p) for p in first.hypernet.parameters()}
    trainable = deltatune.trainable_parameters(model)
    assert sum(id(p) in hypernet for p in trainable) == len(hypernet)  # listed once
    assert sum(p.numel() for p in trainable) == (
        deltatune.get_method("hyperformer").delta.num_shared_parameters(deltatune.adapters(model)["sst2"],
                                                                        _hosts(model)) + SMALL["task_dim"])
    with deltatune.use(model, "mnli"):
        model(x).logits.pow(2).mean().backward()
    heads = (first.hypernet.down_head, first.hypernet.up_head)  # what mnli's loss trains in sst2's hypernetwork
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for head in heads for p in head.parameters())
    assert first.task_embedding.grad is None and second.task_embedding.grad.abs().sum() > 0


def _hosts(model):
    from deltatune.core.slot import slots_of

    return {p: s.info for p, _, s in slots_of(model) if "sst2" in s}


def test_tasks_get_different_generated_adapters_and_mix_per_row():
    model, x = two_tasks()
    path = "model.layers.0.mlp.down_proj"
    down_a, *_ = delta_at(model, path, "sst2").projections()
    down_b, *_ = delta_at(model, path, "mnli").projections()
    assert not torch.allclose(down_a, down_b)
    with deltatune.use(model, "sst2"):
        a = run(model, x)
    with deltatune.use(model, "mnli"):
        b = run(model, x)
    assert (a - b).abs().max() > 1e-4
    assert_per_sample_matches_alone(model, x, ["mnli", None, "sst2"])


def test_tasks_save_and_load_together(tmp_path):
    model, x = two_tasks()
    outputs = {}
    for name in ("sst2", "mnli"):
        deltatune.save(model, tmp_path / name, name=name)
        with deltatune.use(model, name):
            outputs[name] = run(model, x)
    fresh, _ = make("llama")
    deltatune.load(fresh, tmp_path / "sst2", name="sst2")
    deltatune.load(fresh, tmp_path / "mnli", name="mnli")
    assert shared_of(fresh, "sst2").hypernet is shared_of(fresh, "mnli").hypernet
    for name in ("sst2", "mnli"):
        with deltatune.use(fresh, name):
            torch.testing.assert_close(run(fresh, x), outputs[name], atol=1e-5, rtol=1e-5)


def test_on_blocks_keeps_the_contract(tmp_path):
    module_host_contract("hyperformer", SMALL, "gpt2", ["transformer.h.0.attn", "transformer.h.1.mlp"], tmp_path)


def test_bad_input_is_one_clear_error():
    with pytest.raises(DeltatuneError, match="task_dim=0"):
        deltatune.config("hyperformer", task_dim=0)
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match="hypernetwork_from='sst2' is not a hyperformer adapter"):
        deltatune.attach(model, deltatune.config("hyperformer", hypernetwork_from="sst2", **SMALL), name="mnli")
    assert deltatune.adapters(model) == {}
    deltatune.attach(model, deltatune.config("hyperformer", **SMALL), name="sst2")
    with pytest.raises(DeltatuneError, match="another shape"):
        deltatune.attach(model, deltatune.config("hyperformer", **{**SMALL, "r": 3}, hypernetwork_from="sst2"),
                         name="mnli")
