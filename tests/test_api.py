"""Routing (use / per_sample), merging rules, delete, and the errors of the model-level API."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune
from deltatune import DeltatuneError
from toys import assert_per_sample_matches_alone, make, perturb, run


def _two_adapters(toy="llama"):
    model, x = make(toy)
    targets = {"llama": ["q_proj", "v_proj"], "mlp": ["lin0", "lin2"]}[toy]
    deltatune.attach(model, deltatune.config("lora", r=4, targets=targets), name="a")
    deltatune.attach(model, deltatune.config("dora", r=2, targets=targets[:1]), name="b")
    perturb(model, "a", 0)
    perturb(model, "b", 1)
    return model, x


def test_most_recent_adapter_is_active_and_use_switches():
    model, x = _two_adapters()
    assert deltatune.active(model) == ("b",)
    out_b = run(model, x)
    with deltatune.use(model, "a"):
        out_a = run(model, x)
        assert deltatune.active(model) == ("a",)
    assert deltatune.active(model) == ("b",)
    torch.testing.assert_close(run(model, x), out_b)
    assert not torch.allclose(out_a, out_b)
    deltatune.use(model, "a")  # a plain call stays in effect
    torch.testing.assert_close(run(model, x), out_a)


def test_several_active_adapters_add_up_for_additive_methods():
    model = nn.Sequential(nn.Linear(10, 5))
    x = torch.randn(4, 10)
    base = run(model, x)
    for name, seed in (("a", 0), ("b", 1)):
        deltatune.attach(model, deltatune.config("lora", r=3, targets=["0"]), name=name)
        perturb(model, name, seed)
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        with deltatune.use(model, names):
            outs[tuple(names)] = run(model, x)
    torch.testing.assert_close(outs[("a", "b")] - base, (outs[("a",)] - base) + (outs[("b",)] - base))
    with deltatune.use(model, ["a", "b"]):
        deltatune.merge(model)
        torch.testing.assert_close(run(model, x), outs[("a", "b")], atol=1e-5, rtol=1e-5)
        deltatune.unmerge(model)


def test_use_errors():
    model, _ = _two_adapters()
    with pytest.raises(DeltatuneError, match="unknown adapter 'c'; valid: a, b"):
        deltatune.use(model, ["a", "c"])
    with pytest.raises(DeltatuneError, match="got a name twice"):
        deltatune.use(model, ["a", "a"])
    plain, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no deltas attached"):
        deltatune.use(plain, "a")


def test_merged_adapters_cannot_be_switched_off():
    model, x = _two_adapters()
    with deltatune.use(model, "a"):
        deltatune.merge(model)
        with pytest.raises(DeltatuneError, match=r"\['a'\] are merged"):
            deltatune.use(model, None)
        with pytest.raises(DeltatuneError, match="merged"):
            deltatune.per_sample(model, ["a", None, "b"])
        with pytest.raises(DeltatuneError, match="unmerge it before deleting"):
            deltatune.delete(model, "a")
        deltatune.merge(model)  # merging again changes nothing
        deltatune.unmerge(model)


def test_merge_then_unmerge_in_wrong_order_is_refused_without_change():
    model, x = _two_adapters()
    deltatune.merge(model, ["a"])
    deltatune.merge(model, ["b"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltatuneError, match="reverse order"):
        deltatune.unmerge(model, "a")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    deltatune.unmerge(model, "b")
    deltatune.unmerge(model, "a")


def test_merge_all_active_and_detach_keeps_merged_weights():
    model, x = _two_adapters()
    with deltatune.use(model, ["a", "b"]):
        expected = run(model, x)
        deltatune.merge(model)
    deltatune.detach(model)
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=1e-5)
    assert not any(".deltatune." in k for k in model.state_dict())


def test_merge_refuses_tied_weights():
    model, x = make("gpt2")  # wte is tied to lm_head
    deltatune.attach(model, deltatune.config("lora", targets=["wte"]))
    perturb(model, "default", 0)
    with pytest.raises(DeltatuneError, match="tied to"):
        deltatune.merge(model)


def test_delete_and_attach_errors():
    model, x = _two_adapters()
    deltatune.delete(model, "b")
    assert list(deltatune.adapters(model)) == ["a"] and deltatune.active(model) == ()
    with pytest.raises(DeltatuneError, match="already attached"):
        deltatune.attach(model, deltatune.config("lora", targets=["q_proj"]), name="a")
    with pytest.raises(DeltatuneError, match="adapter name must be"):
        deltatune.attach(model, deltatune.config("lora", targets=["q_proj"]), name="x.y")
    with pytest.raises(DeltatuneError, match="expected a deltatune config"):
        deltatune.attach(model, {"method": "lora"})
    deltatune.delete(model, "a")
    assert not any(".deltatune." in k for k in model.state_dict())


def test_per_sample_errors_and_generate_expansion():
    model, x = _two_adapters()
    with pytest.raises(DeltatuneError, match="one adapter name"):
        deltatune.per_sample(model, "a")
    with pytest.raises(DeltatuneError, match="unknown adapter"):
        deltatune.per_sample(model, ["a", "zz", None])
    with deltatune.per_sample(model, ["a", None]):
        with pytest.raises(DeltatuneError, match="got 2 adapter names but module .* batch of 3 rows"):
            run(model, x)
    # generate() with num_return_sequences repeats each row: per_sample names follow their prompt
    model.generation_config.pad_token_id = 0
    with torch.no_grad(), deltatune.per_sample(model, ["a", None, "b"]):
        mixed = model.generate(x, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    for i, name in enumerate(["a", None, "b"]):
        with torch.no_grad(), deltatune.use(model, name):
            alone = model.generate(x[i : i + 1], max_new_tokens=3, do_sample=False, num_beams=2,
                                   num_return_sequences=2)
        assert torch.equal(mixed[2 * i : 2 * i + 2], alone)


def test_per_sample_can_train_several_adapters_in_one_batch():
    model, x = _two_adapters("mlp")
    model.train()
    with deltatune.per_sample(model, ["a", "b", None]):
        run_out = model(x)
    run_out.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".b." in n)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=6))
def test_per_sample_matches_rows_alone_for_any_assignment(names):
    model, _ = _two_adapters("mlp")
    x = torch.randn(len(names), 10, generator=torch.Generator().manual_seed(len(names)))
    assert_per_sample_matches_alone(model, x, names, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_and_set_trainable():
    model, _ = _two_adapters()
    assert len(deltatune.trainable_parameters(model)) == 8 + 2 * 3
    deltatune.set_trainable(model, "a", False)
    assert len(deltatune.trainable_parameters(model)) == 2 * 3
    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert all(".deltatune.b." in n for n in names)
