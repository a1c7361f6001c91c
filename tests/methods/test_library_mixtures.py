"""The generic matrix's properties for the library mixtures (X-LoRA, Arrow), which need their expert adapters attached
before they are: changes the output, merge refused, save/load, only the router's parameters train, disabling, mixed
batches equal rows alone, parameter count, detach, saved key names; and the composition blocks around them.
Rows: LIBRARY_ROWS in tests/matrix_rows/mixtures.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune import Average, Stack
from deltatune.core.hosts import LINEAR_KINDS, host_kind
from deltatune.core.slot import is_delta_parameter, slots_of
from matrix_rows.mixtures import LIBRARY_ROWS
from peft_roundtrip import peft, randomise
from toys import BATCH, TOYS, assert_per_sample_matches_alone, make, perturb, run

CASES = [pytest.param(method, fields, experts, toy, id=f"{row}-{toy}")
         for row, method, fields, experts, toys in LIBRARY_ROWS for toy in toys]
SNAPSHOTS = Path(__file__).parent.parent / "snapshots" / "keys"
UPDATE = os.environ.get("DELTATUNE_UPDATE_SNAPSHOTS") == "1"


def peft_lora_library(tmp_path, r: int = 2, count: int = 2) -> list[str]:
    """Directories of `count` PEFT LoRAs (q_proj, v_proj) with random non-zero weights on the tiny Llama."""
    base, _ = make("llama")
    paths = []
    for i in range(count):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                                         target_modules=["q_proj", "v_proj"]))
        randomise(model, seed=i)
        model.save_pretrained(tmp_path / f"e{i}")
        paths.append(str(tmp_path / f"e{i}"))
    return paths


def router_over(method: str, paths: list[str], name: str, **fields):
    """The tiny Llama with the library loaded as e0, e1, ... and a `method` router `name` over it."""
    model, x = make("llama")
    for i, path in enumerate(paths):
        deltatune.load(model, path, name=f"e{i}")
    deltatune.attach(model, deltatune.config(method, experts=[f"e{i}" for i in range(len(paths))], **fields),
                     name=name)
    return model, x


def with_experts(toy: str, experts: list):
    """A toy with the expert adapters attached (same weights every time) on its linear layers."""
    model, x = make(toy)
    kinds = {p.rsplit(".", 1)[-1]: host_kind(m) for p, m in model.named_modules() if p}
    targets = [t for t in TOYS[toy][2] if kinds[t] in LINEAR_KINDS]
    torch.manual_seed(0)  # the experts' random inits
    for i, (name, method, fields) in enumerate(experts):
        deltatune.attach(model, deltatune.config(method, targets=targets, **fields), name=name)
        perturb(model, name, seed=10 + i)
    return model, x


def routed(method, fields, experts, toy, name="default", seed=0):
    model, x = with_experts(toy, experts)
    deltatune.attach(model, deltatune.config(method, **fields), name=name)
    perturb(model, name, seed=seed)
    return model, x


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_changes_the_output_and_refuses_to_merge(method, fields, experts, toy):
    model, x = routed(method, fields, experts, toy)
    with deltatune.use(model, None):
        base = run(model, x)
    assert (run(model, x) - base).abs().max() > 1e-3
    with pytest.raises(deltatune.DeltatuneError, match="cannot be merged"):
        deltatune.merge(model)


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_save_load_roundtrip_next_to_the_same_experts(method, fields, experts, toy, tmp_path):
    model, x = routed(method, fields, experts, toy)
    adapted = run(model, x)
    deltatune.save(model, tmp_path / "a")
    fresh, _ = with_experts(toy, experts)
    deltatune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), adapted, atol=1e-5, rtol=1e-5)
    assert deltatune.adapters(fresh)["default"] == deltatune.adapters(model)["default"]
    bare, _ = make(toy)
    with pytest.raises(deltatune.DeltatuneError, match="not attached"):
        deltatune.load(bare, tmp_path / "a")
    assert not slots_of(bare)


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_only_the_routers_parameters_train(method, fields, experts, toy):
    model, x = routed(method, fields, experts, toy)
    for name, _, _ in experts:
        deltatune.set_trainable(model, name, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".deltatune.default." in n for n in trainable)
    assert bool(trainable) == (deltatune.get_method(method).delta.num_shared_parameters(
        deltatune.adapters(model)["default"], {p: s.info for p, _, s in slots_of(model) if "default" in s}) > 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    if trainable:
        out = model(x)
        (out.logits if hasattr(out, "logits") else out).pow(2).mean().backward()
        torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_disable_gives_base_and_detach_gives_the_plain_model(method, fields, experts, toy):
    plain, x = make(toy)
    base = run(plain, x)
    model, _ = routed(method, fields, experts, toy)
    adapted = run(model, x)
    with deltatune.use(model, None):
        torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, x), adapted, atol=0, rtol=0)
    deltatune.detach(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_per_sample_equals_rows_alone(method, fields, experts, toy):
    model, x = routed(method, fields, experts, toy, name="a", seed=0)
    deltatune.attach(model, deltatune.config(method, **fields), name="b")
    perturb(model, "b", seed=1)
    assert_per_sample_matches_alone(model, x, ["a", None, "b"][:BATCH])
    assert_per_sample_matches_alone(model, x, ["b", "e0", "a"][:BATCH])  # a router beside a plain expert


@pytest.mark.parametrize("method,fields,experts,toy", CASES)
def test_parameter_count_formula(method, fields, experts, toy):
    model, _ = routed(method, fields, experts, toy)
    spec = deltatune.get_method(method)
    config = deltatune.adapters(model)["default"]
    hosts = {path: slot.info for path, _, slot in slots_of(model) if "default" in slot}
    formula = sum(spec.delta.num_parameters(config, info, path) for path, info in hosts.items())
    formula += spec.delta.num_shared_parameters(config, hosts)
    actual = sum(p.numel() for n, p in model.named_parameters() if ".deltatune.default." in n)
    assert actual == formula and all(is_delta_parameter(n) for n, _ in model.named_parameters()
                                     if ".deltatune.default." in n)


@pytest.mark.parametrize("row,method,fields,experts,toy", [
    pytest.param(row, method, fields, experts, toy, id=f"{row}-{toy}")
    for row, method, fields, experts, toys in LIBRARY_ROWS for toy in toys])
def test_saved_key_names_are_stable(row, method, fields, experts, toy, tmp_path):
    from safetensors import safe_open

    model, _ = routed(method, fields, experts, toy)
    deltatune.save(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f"{k} {tuple(f.get_slice(k).get_shape())}" for k in f.keys())
    snap = SNAPSHOTS / f"{row}-{toy}.txt"
    if UPDATE:
        snap.write_text("\n".join(keys) + "\n")
    assert snap.exists(), f"no key snapshot {snap.name}; run with DELTATUNE_UPDATE_SNAPSHOTS=1 once"
    assert snap.read_text().splitlines() == keys


@pytest.mark.parametrize("method,fields,experts,toy", [c for c in CASES if c.values[3] == "llama"])
def test_average_one_hot_is_the_router_and_stack_adds_a_lora(method, fields, experts, toy):
    model, x = routed(method, fields, experts, toy)
    deltatune.attach(model, deltatune.config("lora", targets=["q_proj"], r=2), name="extra")
    perturb(model, "extra", seed=7)
    with deltatune.use(model, "default"):
        alone = run(model, x)
    with deltatune.use(model, Average("default", "extra", weights=[1.0, 0.0])):
        torch.testing.assert_close(run(model, x), alone, atol=1e-6, rtol=1e-6)
    with deltatune.use(model, Average("extra", "default", weights=[0.0, 1.0])):
        torch.testing.assert_close(run(model, x), alone, atol=1e-6, rtol=1e-6)
    # Stack: on a layer, the router's update plus the LoRA's, whatever the router decided there.
    layer = model.model.layers[0].self_attn.q_proj
    calls = []
    hook = layer.register_forward_hook(lambda m, args, out: calls.append((args[0], out)) and None)
    with deltatune.use(model, Stack("default", "extra")):
        run(model, x)
    hook.remove()
    h, stacked = calls[-1]  # the real pass (X-LoRA runs a scaling pass first)
    updates = {}
    with torch.no_grad():
        for node in (None, "default", "extra"):  # X-LoRA reuses the scalings of the forward above
            with deltatune.use(model, node):
                updates[node] = layer(h)
    router, lora = updates["default"] - updates[None], updates["extra"] - updates[None]
    assert router.abs().max() > 1e-4 and lora.abs().max() > 1e-4
    torch.testing.assert_close(stacked - updates[None], router + lora, atol=1e-5, rtol=1e-5)
