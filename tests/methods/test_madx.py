"""MAD-X invertible adapters: the coupling is exactly invertible, the body's layers read coupled embeddings and the
LM head reads the inverse of the body's output; module-host contract, generation, composition, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import assert_generation_per_sample_matches_alone, delta_at, module_host_contract
from toys import make, perturb, run

import deltatune
import deltatune.methods.madx
from deltatune import DeltatuneError, Stack
from deltatune.core.slot import slots_of


def llama_with_adapter():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("invertible_adapter", init="random"), name="inv")
    perturb(model, "inv", seed=0, scale=0.5)
    return model, x, delta_at(model, "model", "inv")


def test_coupling_and_its_inverse_are_exact():
    _, _, delta = llama_with_adapter()
    e = torch.randn(4, 7, 16)
    with torch.no_grad():
        coupled = delta.couple(e)
        assert (coupled - e).abs().max() > 1e-2
        torch.testing.assert_close(delta.inverse(coupled), e, atol=1e-5, rtol=0)
        torch.testing.assert_close(delta.couple(delta.inverse(e)), e, atol=1e-5, rtol=0)


def test_layers_read_coupled_embeddings_and_the_head_reads_the_inverse():
    model, x, delta = llama_with_adapter()
    assert [p for p, _, _ in slots_of(model)] == ["model"]
    seen = {}
    hooks = [model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.update(layer=a[0])),
             model.model.norm.register_forward_hook(lambda m, a, out: seen.update(norm=out)),
             model.lm_head.register_forward_pre_hook(lambda m, a: seen.update(head=a[0]))]
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(seen["layer"], delta.couple(model.model.embed_tokens(x)))
        torch.testing.assert_close(seen["head"], delta.inverse(seen["norm"]))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("toy,body", [("llama", "model"), ("gpt2", "transformer")])
def test_body_host_keeps_the_contract(toy, body, tmp_path):
    module_host_contract("invertible_adapter", {"init": "random"}, toy, [body], tmp_path)


def test_default_placement_is_the_body_and_identity_init_changes_nothing():
    model, x = make("gpt2")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("invertible_adapter"))
    assert [p for p, _, _ in slots_of(model)] == ["transformer"]
    torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)


def test_generate_with_per_sample_matches_each_row_alone():
    model, x, _ = llama_with_adapter()
    assert_generation_per_sample_matches_alone(model, x, ["inv", None, "inv"])


def test_language_adapter_stack():
    model, x, _ = llama_with_adapter()
    deltatune.attach(model, deltatune.config("pfeiffer", r=2), name="lang")
    deltatune.attach(model, deltatune.config("pfeiffer", r=2), name="task")
    perturb(model, "lang", seed=1)
    perturb(model, "task", seed=2)
    with deltatune.use(model, ["inv", "lang", "task"]):
        listed = run(model, x)
    with deltatune.use(model, Stack("inv", "lang", "task")):
        stacked = run(model, x)
    with deltatune.use(model, ["lang", "task"]):
        without_inverse = run(model, x)
    torch.testing.assert_close(stacked, listed)
    assert (stacked - without_inverse).abs().max() > 1e-3


def test_bad_input_is_one_clear_error():
    with pytest.raises(DeltatuneError, match="reduction_factor must be > 0"):
        deltatune.config("invertible_adapter", reduction_factor=0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no transformer body"):
        deltatune.attach(model, deltatune.config("invertible_adapter"))
    with pytest.raises(DeltatuneError, match="target 'lin1' is a Linear"):
        deltatune.attach(model, deltatune.config("invertible_adapter", targets=["lin1"]))
