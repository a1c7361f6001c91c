"""The shared factored base (methods/factored.py): the gathered mixed-batch kernel with factors of different widths,
its stack cache across routing changes, and the in-place fused forward next to other deltas on the same host."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.methods.factored import FactoredDelta
from toys import assert_per_sample_matches_alone, make, perturb, run

# (method, fields of adapter a, fields of adapter b): the two adapters' factors have different widths k.
WIDTHS = [
    ("abba", {"r1": 1, "r2": 2}, {"r1": 2, "r2": 3}),  # k = r1·r2 (Khatri-Rao)
    ("multilora", {"r": 2, "n": 1}, {"r": 1, "n": 3}),
    ("lora_xs", {"r": 2}, {"r": 3}),
    ("loretta", {"r": 2}, {"r": 3}),
]
TARGETS = {"llama": ["q_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"],
           "conv": ["conv2d", "conv1d", "head"]}


def _two_adapters(method: str, a: dict, b: dict, toy: str):
    model, x = make(toy)
    deltatune.attach(model, deltatune.config(method, targets=TARGETS[toy], **a), name="a")
    deltatune.attach(model, deltatune.config(method, targets=TARGETS[toy], **b), name="b")
    perturb(model, "a", seed=0)
    perturb(model, "b", seed=1)
    return model, x


@pytest.mark.parametrize("toy", sorted(TARGETS))
@pytest.mark.parametrize("method,a,b", WIDTHS)
def test_gathered_rows_with_other_widths_equal_each_adapter_alone(method, a, b, toy):
    model, x = _two_adapters(method, a, b, toy)
    assert deltatune.get_method(method).delta.per_row.__func__ is FactoredDelta.per_row.__func__
    assert_per_sample_matches_alone(model, x, ["b", None, "a"])


def test_cached_stack_follows_parameter_changes():
    """Without gradients the stacked factors survive routing changes, but an in-place update invalidates them."""
    model, x = _two_adapters("abba", {"r1": 1, "r2": 2}, {"r1": 2, "r2": 3}, "llama")
    with deltatune.per_sample(model, ["a", "b", None]):
        before = run(model, x)
    with torch.no_grad():
        for p in deltatune.trainable_parameters(model):
            p.mul_(2.0)
    with deltatune.per_sample(model, ["a", "b", None]):
        after = run(model, x)
    with deltatune.use(model, "a"):
        torch.testing.assert_close(after[:1], run(model, x[:1]), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(before[:2], after[:2])


def test_in_place_forward_leaves_the_base_output_to_later_deltas():
    """A fused in-place update must not write into the base output while a later delta (Hydra) still reads it."""
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("lora_xs", r=2, targets=["q_proj"]), name="first")
    deltatune.attach(model, deltatune.config("hydra", r=2, targets=["q_proj"]), name="second")
    perturb(model, "first", seed=0)
    perturb(model, "second", seed=1)
    with deltatune.use(model, ["first", "second"]):
        chained = run(model, x)
        model.train()  # and gradients flow through the in-place update
        out = model(x).logits
        out.pow(2).mean().backward()
        model.eval()
        deltatune.merge(model)
        torch.testing.assert_close(run(model, x), chained, atol=2e-5, rtol=1e-4)
