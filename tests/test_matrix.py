"""The generic test matrix: every registered method × every toy model, checking the contract.

Adding a method adds one line to its family's ROWS in tests/matrix_rows/; `test_every_method_has_a_row` enforces it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.core.hosts import MODULE_KIND, host_kind
from deltatune.core.slot import is_delta_parameter, slots_of
from toys import BATCH, TOYS, assert_per_sample_matches_alone, make, perturb, run

from matrix_rows import collect_rows

MATRIX = collect_rows()  # one line per method (or notable option set), in tests/matrix_rows/<family>.py
SNAPSHOTS = Path(__file__).parent / "snapshots" / "keys"
UPDATE = os.environ.get("DELTATUNE_UPDATE_SNAPSHOTS") == "1"


def _targets(model, method: str, model_name: str) -> list[str] | None:
    """The toy's listed layers the method adapts; None (the method's default placement) for a model-level method
    (one that sits only on whole modules, e.g. prompt tuning on the body) on a model with a body."""
    spec = deltatune.get_method(method)
    if spec.hosts == (MODULE_KIND,) and getattr(model, "base_model", model) is not model:
        return None
    modules = dict(model.named_modules())
    kinds = {p.rsplit(".", 1)[-1]: host_kind(m) for p, m in modules.items() if p}
    return [t for t in TOYS[model_name][2] if kinds[t] in spec.hosts]


def _attach(model, method, fields, model_name, name="default", seed=None):
    targets = _targets(model, method, model_name)
    if targets == []:
        pytest.skip(f"{method} adapts none of {model_name}'s layer kinds")
    deltatune.attach(model, deltatune.config(method, targets=targets, **fields), name=name)
    if seed is not None:
        perturb(model, name, seed)
    return targets


CASES = [pytest.param(m, f, toy, id=f"{row}-{toy}") for row, m, f in MATRIX for toy in TOYS]


def test_every_method_has_a_row():
    from matrix_rows.mixtures import LIBRARY_ROWS  # methods over attached experts: tests/methods/test_library_mixtures.py

    assert set(deltatune.list_methods()) <= {m for _, m, _ in MATRIX} | {row[1] for row in LIBRARY_ROWS}


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_identity_at_init(method, fields, toy):
    model, x = make(toy)
    base = run(model, x)
    _attach(model, method, fields, toy)
    spec = deltatune.get_method(method)
    if spec.delta.identity_for(deltatune.adapters(model)["default"]):
        torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_merge_unmerge(method, fields, toy):
    model, x = make(toy)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model, x)
    _attach(model, method, fields, toy, seed=0)
    adapted = run(model, x)
    assert (adapted - base).abs().max() > 1e-3, "a perturbed adapter must change the output"
    if not deltatune.get_method(method).mergeable:
        with pytest.raises(deltatune.DeltatuneError):
            deltatune.merge(model)
        return
    deltatune.merge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=2e-5, rtol=1e-4)
    deltatune.unmerge(model)
    torch.testing.assert_close(run(model, x), adapted, atol=2e-5, rtol=1e-4)
    for k, v in model.state_dict().items():
        if not is_delta_parameter(k):
            torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=0, msg=f"unmerge left {k} changed")


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_safe_merge_refuses_nan(method, fields, toy):
    model, x = make(toy)
    _attach(model, method, fields, toy, seed=0)
    if not deltatune.get_method(method).mergeable:
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        deltatune.trainable_parameters(model)[-1].fill_(float("nan"))
    with pytest.raises(deltatune.DeltatuneError, match="NaN"):
        deltatune.merge(model, safe=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or torch.isnan(v).any(), f"{k} changed by a refused merge"


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_save_load_roundtrip(method, fields, toy, tmp_path):
    model, x = make(toy)
    _attach(model, method, fields, toy, seed=0)
    adapted = run(model, x)
    deltatune.save(model, tmp_path / "a")
    fresh, _ = make(toy)
    deltatune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), adapted, atol=1e-5, rtol=1e-5)  # top-k formats round through exp/log
    assert deltatune.adapters(fresh)["default"] == deltatune.adapters(model)["default"]


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_only_delta_parameters_train(method, fields, toy):
    model, x = make(toy)
    _attach(model, method, fields, toy, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_delta_parameter(n) for n in trainable)
    assert len(deltatune.trainable_parameters(model)) == len(trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    out.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, f"base parameters changed: {sorted(changed - trainable)}"


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_disable_gives_base(method, fields, toy):
    model, x = make(toy)
    base = run(model, x)
    _attach(model, method, fields, toy, seed=0)
    adapted = run(model, x)
    with deltatune.use(model, None):
        torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, x), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_per_sample_equals_rows_alone(method, fields, toy):
    model, x = make(toy)
    _attach(model, method, fields, toy, name="a", seed=0)
    _attach(model, method, fields, toy, name="b", seed=1)
    assert_per_sample_matches_alone(model, x, ["a", None, "b"][:BATCH])


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_parameter_count_formula(method, fields, toy):
    model, _ = make(toy)
    _attach(model, method, fields, toy)
    spec = deltatune.get_method(method)
    config = deltatune.adapters(model)["default"]
    hosts = {path: slot.info for path, _, slot in slots_of(model)}
    try:
        formula = sum(spec.delta.num_parameters(config, info, path) for path, info in hosts.items())
    except deltatune.DeltatuneError as err:  # a count that needs the whole model (prefix tuning: its layers)
        pytest.skip(str(err))
    formula += spec.delta.num_shared_parameters(config, hosts)
    actual = sum(p.numel() for p in deltatune.trainable_parameters(model))
    assert actual == formula


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_saved_key_names_are_stable(method, fields, toy, tmp_path):
    from safetensors import safe_open

    model, _ = make(toy)
    _attach(model, method, fields, toy)
    deltatune.save(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f"{k} {tuple(f.get_slice(k).get_shape())}" for k in f.keys())
    row = next(r for r, m, fl in MATRIX if m == method and fl == fields)
    snap = SNAPSHOTS / f"{row}-{toy}.txt"
    if UPDATE:
        snap.write_text("\n".join(keys) + "\n")
    assert snap.exists(), f"no key snapshot {snap.name}; run with DELTATUNE_UPDATE_SNAPSHOTS=1 once"
    assert snap.read_text().splitlines() == keys


@pytest.mark.parametrize("method,fields,toy", CASES)
def test_detach_gives_plain_model(method, fields, toy):
    model, x = make(toy)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = run(model, x)
    _attach(model, method, fields, toy, seed=0)
    deltatune.detach(model)
    assert not slots_of(model) and not hasattr(model, "_deltatune_state")
    assert all(not m._forward_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
