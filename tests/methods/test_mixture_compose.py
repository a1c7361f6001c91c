"""Every self-contained mixture inside the composition blocks: Average with one-hot weights is that adapter, Stack with
a LoRA adds the LoRA's update, BatchSplit equals per-row runs; routing() returns every layer's last decision and refuses
an unknown adapter."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import Average, BatchSplit, DeltatuneError, Stack
from deltatune.core.slot import slots_of
from deltatune.methods.mixture import routing
from matrix_rows.mixtures import ROWS
from toys import make, perturb, run

CASES = [pytest.param(method, fields, id=row) for row, method, fields in ROWS]
TARGETS = ["q_proj", "v_proj"]


def _with_lora(method, fields):
    model, x = make("llama")
    for name, m, f in [("mix", method, fields), ("lora", "lora", {"r": 2})]:
        deltatune.attach(model, deltatune.config(m, targets=TARGETS, **f), name=name)
        perturb(model, name, seed=len(name))
    return model, x


@pytest.mark.parametrize("method,fields", CASES)
def test_average_one_hot_and_batch_split(method, fields):
    model, x = _with_lora(method, fields)
    with deltatune.use(model, "mix"):
        alone = run(model, x)
    with deltatune.use(model, Average("mix", "lora", weights=[1.0, 0.0])):
        torch.testing.assert_close(run(model, x), alone, atol=1e-6, rtol=1e-6)
    with deltatune.use(model, BatchSplit("lora", "mix", sizes=[1, 2])):
        split = run(model, x)
    torch.testing.assert_close(split[1:], alone[1:], atol=1e-5, rtol=1e-5)
    with deltatune.use(model, "lora"):
        torch.testing.assert_close(split[:1], run(model, x[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,fields", CASES)
def test_stack_with_lora_adds_the_lora_update_on_a_layer(method, fields):
    model, x = _with_lora(method, fields)
    layer = model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 4, 16)
    with torch.no_grad():
        outputs = {}
        for key, node in [("base", None), ("mix", "mix"), ("lora", "lora"), ("both", Stack("mix", "lora"))]:
            with deltatune.use(model, node):
                outputs[key] = layer(h)
    update = (outputs["mix"] - outputs["base"]) + (outputs["lora"] - outputs["base"])
    torch.testing.assert_close(outputs["both"] - outputs["base"], update, atol=1e-5, rtol=1e-5)


def test_routing_of_an_unknown_adapter_is_an_error():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no adapter named 'x'"):
        routing(model, "x")


@pytest.mark.parametrize("method,fields", CASES)
def test_routing_returns_the_last_decision_of_every_layer(method, fields):
    model, x = _with_lora(method, fields)
    paths = {path for path, _, slot in slots_of(model) if "mix" in slot}
    with deltatune.use(model, "mix"):
        run(model, x)
        first = routing(model, "mix")
        run(model, x[:1])  # a later call replaces the record
        last = routing(model, "mix")
    assert set(first) == set(last) == paths and not routing(model, "lora")
    for path, record in last.items():
        assert record.weights.shape[0] == 1 and first[path].weights.shape[0] == x.shape[0]
        assert torch.isfinite(record.weights).all() and (record.weights >= 0).all()
        assert not record.weights.requires_grad
        if record.indices is not None:  # a top-k router: weight only on the chosen experts
            kept = record.weights.gather(-1, record.indices)
            assert ((record.weights > 0).sum(-1) <= record.indices.shape[-1]).all() and (kept > 0).all()
