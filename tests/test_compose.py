"""Composition blocks: the equivalences that define them, nesting rules, serialisation, and AdapterFusion."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltatune
from deltatune import Average, BatchSplit, DeltatuneError, Fuse, Parallel, Split, Stack
from deltatune.core.compose import block_from_dict
from toys import make, perturb, run

# Methods of several families; compositions must work across them, not for LoRA only.
FAMILIES = [("lora", {"r": 3}), ("dora", {"r": 2}), ("loha", {"r": 2}), ("ia3", {}), ("oft", {"r": 2, "block_size": 0}),
            ("vera", {"r": 4}), ("bitfit", {})]


def _model_with(methods, toy="mlp", targets=("lin0", "lin2")):
    model, x = make(toy)
    for i, (method, fields) in enumerate(methods):
        name = f"m{i}"
        deltatune.attach(model, deltatune.config(method, targets=list(targets), **fields), name=name)
        perturb(model, name, seed=i)
    return model, x


@pytest.mark.parametrize("first,second", [(FAMILIES[i], FAMILIES[j]) for i in range(len(FAMILIES))
                                          for j in range(len(FAMILIES)) if i < j][:12])
def test_stack_of_two_weight_deltas_is_their_sum_and_merges(first, second):
    """On one adapted layer, Stack(a, b) adds both updates; the whole model merges to the same output."""
    model, x = _model_with([first, second], targets=("lin0",))
    layer = model.lin0
    with torch.no_grad():
        with deltatune.use(model, None):
            y0 = layer(x)
        with deltatune.use(model, "m0"):
            y1 = layer(x)
        with deltatune.use(model, "m1"):
            y2 = layer(x)
        with deltatune.use(model, Stack("m0", "m1")):
            both = layer(x)
    torch.testing.assert_close(both - y0, (y1 - y0) + (y2 - y0), atol=1e-5, rtol=1e-5)
    with deltatune.use(model, Stack("m0", "m1")):
        stacked = run(model, x)
        deltatune.merge(model)
        torch.testing.assert_close(run(model, x), stacked, atol=1e-5, rtol=1e-5)
        deltatune.unmerge(model)


@pytest.mark.parametrize("method,fields", FAMILIES)
def test_average_with_one_hot_weights_is_that_adapter(method, fields):
    model, x = _model_with([(method, fields), ("lora", {"r": 2})])
    with deltatune.use(model, "m0"):
        alone = run(model, x)
    with deltatune.use(model, Average("m0", "m1", weights=[1.0, 0.0])):
        torch.testing.assert_close(run(model, x), alone, atol=1e-6, rtol=1e-6)


def test_average_of_loras_is_the_average_update():
    model, x = _model_with([("lora", {"r": 2}), ("lora", {"r": 3})], targets=("lin0",))
    with torch.no_grad():
        with deltatune.use(model, None):
            y0 = model.lin0(x)
        ys = []
        for name in ("m0", "m1"):
            with deltatune.use(model, name):
                ys.append(model.lin0(x))
        with deltatune.use(model, Average("m0", "m1", weights=[0.25, 0.75])):
            avg = model.lin0(x)
    torch.testing.assert_close(avg, y0 + 0.25 * (ys[0] - y0) + 0.75 * (ys[1] - y0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("toy", ["mlp", "llama", "gpt2"])
def test_batch_split_equals_per_row_runs(toy):
    targets = {"mlp": ("lin0", "lin2"), "llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}[toy]
    model, x = _model_with([("lora", {"r": 2}), ("ia3", {}), ("loha", {"r": 2})], toy=toy, targets=targets)
    block = BatchSplit("m0", Stack("m1", "m2"), sizes=[1, 2])
    with deltatune.use(model, block):
        mixed = run(model, x)
    with deltatune.use(model, "m0"):
        torch.testing.assert_close(mixed[:1], run(model, x[:1]), atol=1e-5, rtol=1e-5)
    with deltatune.use(model, Stack("m1", "m2")):
        torch.testing.assert_close(mixed[1:], run(model, x[1:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(DeltatuneError, match="sum to 2 but the batch has 3 rows"):
        with deltatune.use(model, BatchSplit("m0", "m1", sizes=[1, 1])):
            run(model, x)


def test_split_by_position():
    model, x = _model_with([("lora", {"r": 2}), ("dora", {"r": 2})], toy="emb", targets=("emb", "proj"))
    with deltatune.use(model, Split("m0", "m1", at=3)):
        split = run(model, x)
    for name, span in (("m0", slice(0, 3)), ("m1", slice(3, None))):
        with deltatune.use(model, name):
            torch.testing.assert_close(split[:, span], run(model, x)[:, span], atol=1e-6, rtol=1e-6)
    with deltatune.use(model, Split("m0", "m1", at=0)), torch.no_grad():
        at_zero = run(model, x)
    with deltatune.use(model, "m1"):
        torch.testing.assert_close(at_zero, run(model, x), atol=1e-6, rtol=1e-6)


def test_parallel_runs_each_child_on_the_same_inputs():
    model, x = _model_with([("lora", {"r": 2}), ("oft", {"r": 2, "block_size": 0})])
    with torch.no_grad():
        out = deltatune.parallel(model, Parallel("m0", Stack("m0", "m1")), x)
    assert out.shape[0] == 2 * x.shape[0]
    with deltatune.use(model, "m0"):
        torch.testing.assert_close(out[: x.shape[0]], run(model, x), atol=1e-5, rtol=1e-5)
    with deltatune.use(model, ["m0", "m1"]):
        torch.testing.assert_close(out[x.shape[0]:], run(model, x), atol=1e-5, rtol=1e-5)


def test_nesting_rules_and_serialisation():
    tree = Stack("a", Average("b", Fuse("c", "d", fusion="f"), weights=[0.5, 0.5]), BatchSplit("a", "b", sizes=[1, 2]))
    data = json.loads(json.dumps(tree.to_dict()))
    assert block_from_dict(data) == tree
    assert tree.names() == ["a", "b", "c", "d", "f", "a", "b"]
    model, x = _model_with([("lora", {"r": 2})])
    with pytest.raises(DeltatuneError, match="Parallel may only be the root"):
        deltatune.use(model, Stack("m0", Parallel("m0")))
    with pytest.raises(DeltatuneError, match="unknown adapter 'zz'"):
        deltatune.use(model, Stack("m0", "zz"))
    with pytest.raises(DeltatuneError, match="unknown composition block"):
        block_from_dict({"Mix": ["a"]})
    with pytest.raises(DeltatuneError, match="2 children but 3 weights"):
        Average("a", "b", weights=[1, 2, 3])


def test_fusion_starts_as_the_average_and_trains_only_itself():
    model, x = _model_with([("lora", {"r": 2}), ("dora", {"r": 2})], targets=("lin0", "lin1", "lin2"))
    deltatune.attach(model, deltatune.config("fusion", targets=["lin0", "lin1", "lin2"]), name="f")
    for name in ("m0", "m1"):
        deltatune.set_trainable(model, name, False)
    with deltatune.use(model, Average("m0", "m1")):
        average = run(model, x)
    fused_block = Fuse("m0", "m1", fusion="f")
    with deltatune.use(model, fused_block):
        torch.testing.assert_close(run(model, x), average, atol=1e-5, rtol=1e-5)
        model.train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
        model(x).pow(2).sum().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".deltatune.f." in n for n in changed)
    reg = model.lin0.deltatune["f"].regularization_loss()
    assert reg > 0  # V moved away from the identity


def test_save_and_load_a_composition(tmp_path):
    model, x = _model_with([("lora", {"r": 2}), ("ia3", {})])
    tree = Average("m0", "m1", weights=[0.3, 0.7])
    with deltatune.use(model, tree):
        expected = run(model, x)
    deltatune.save_composition(model, tmp_path / "comp", tree)
    fresh, _ = make("mlp")
    loaded = deltatune.load_composition(fresh, tmp_path / "comp")
    assert loaded == tree
    with deltatune.use(fresh, loaded):
        torch.testing.assert_close(run(fresh, x), expected)
