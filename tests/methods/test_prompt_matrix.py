"""The generic matrix's checks for the prompt-style rows (tests/matrix_rows/prompt.py), on the transformer toys with
the methods' default placement (the model body), which the matrix's per-toy target lists cannot express."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from matrix_rows.prompt import ROWS, in_peft_form
from safetensors import safe_open
from toys import BATCH, assert_per_sample_matches_alone, make, perturb, run

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import is_delta_parameter, slots_of
from deltatune.methods.prompt_body import body_dims

TOYS = ["llama", "gpt2"]
CASES = [pytest.param(method, fields, toy, row, id=f"{row}-{toy}") for row, method, fields in ROWS for toy in TOYS]
SNAPSHOTS = Path(__file__).parents[1] / "snapshots" / "keys"


def _attach(model, method, fields, name="default", seed=None):
    deltatune.attach(model, deltatune.config(method, **fields), name=name)
    if seed is not None:
        perturb(model, name, seed)


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_sits_on_the_body_and_is_not_the_identity(method, fields, toy, row):
    model, x = make(toy)
    base = run(model, x)
    _attach(model, method, fields)
    assert [path for path, _, _ in slots_of(model)] == [_body_path(model)]
    assert not deltatune.get_method(method).delta.identity_for(deltatune.adapters(model)["default"])
    adapted = run(model, x)
    assert adapted.shape == base.shape and (adapted - base).abs().max() > 1e-4


def _body_path(model) -> str:
    return next(p for p, m in model.named_modules() if m is model.base_model)


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_merge_is_refused_and_changes_nothing(method, fields, toy, row):
    model, x = make(toy)
    _attach(model, method, fields, seed=0)
    adapted = run(model, x)
    with pytest.raises(DeltatuneError, match="acts on activations and cannot be merged"):
        deltatune.merge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_save_load_roundtrip(method, fields, toy, row, tmp_path):
    model, x = make(toy)
    _attach(model, method, fields, seed=0)
    deltatune.save(model, tmp_path / "a")
    fresh, _ = make(toy)
    deltatune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=0)
    assert deltatune.adapters(fresh)["default"] == deltatune.adapters(model)["default"]


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_only_delta_parameters_train(method, fields, toy, row):
    model, x = make(toy)
    _attach(model, method, fields, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_delta_parameter(n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    model(x).logits.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # every delta parameter gets a gradient through the body


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_disable_gives_base(method, fields, toy, row):
    model, x = make(toy)
    base = run(model, x)
    _attach(model, method, fields, seed=0)
    adapted = run(model, x)
    with deltatune.use(model, None):
        torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
    torch.testing.assert_close(run(model, x), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_per_sample_equals_rows_alone(method, fields, toy, row):
    model, x = make(toy)
    _attach(model, method, fields, name="a", seed=0)
    _attach(model, method, {**fields, "num_virtual_tokens": fields["num_virtual_tokens"] + 2}, name="b", seed=1)
    assert_per_sample_matches_alone(model, x, ["a", None, "b"][:BATCH], atol=1e-5)


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_parameter_count_formula(method, fields, toy, row):
    model, _ = make(toy)
    _attach(model, method, fields)
    config = deltatune.adapters(model)["default"]
    (path, body, slot), = slots_of(model)
    actual = sum(p.numel() for p in deltatune.trainable_parameters(model))
    assert config.count(body_dims(body, path, method)) == actual
    if method == "prefix_tuning":  # needs the layer count, which a HostInfo does not carry
        with pytest.raises(DeltatuneError, match="depends on the model's layers"):
            deltatune.get_method(method).delta.num_parameters(config, slot.info, path)
    else:
        assert deltatune.get_method(method).delta.num_parameters(config, slot.info, path) == actual


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_saved_key_names_are_stable(method, fields, toy, row, tmp_path):
    model, _ = make(toy)
    _attach(model, method, fields)
    deltatune.save(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f"{in_peft_form(k)} {tuple(f.get_slice(k).get_shape())}" for k in f.keys())
    snap = SNAPSHOTS / f"{row}-{toy}.txt"
    if os.environ.get("DELTATUNE_UPDATE_SNAPSHOTS") == "1":
        snap.write_text("\n".join(keys) + "\n")
    assert snap.read_text().splitlines() == keys


@pytest.mark.parametrize("method,fields,toy,row", CASES)
def test_detach_gives_plain_model(method, fields, toy, row):
    model, x = make(toy)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = run(model, x)
    _attach(model, method, fields, seed=0)
    deltatune.detach(model)
    assert not slots_of(model) and not hasattr(model, "_deltatune_state")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
