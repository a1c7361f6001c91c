"""Adapter arithmetic and conversion, checked against the dense-weight formula on every module."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import tiny_llama

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.core.slot import Host, slots_of
from deltatune.merging import combine, convert, get_merge_method

X = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model_with_adapters():
    """A tiny Llama with LoRA (two ranks, one on the embedding), DoRA and LoHa adapters of random weights."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    deltatune.attach(model, deltatune.config("lora", r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"],
                                             init="random"), name="a")
    deltatune.attach(model, deltatune.config("lora", r=2, alpha=2, targets=["q_proj", "down_proj"], init="random"),
                     name="b")
    deltatune.attach(model, deltatune.config("dora", r=2, targets=["q_proj", "v_proj"]), name="c")
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["v_proj"]), name="d")
    with torch.no_grad():
        for p in deltatune.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model


def dense_updates(model, name):
    out = {}
    for path, module, slot in slots_of(model):
        if name in slot:
            out[path] = to_matrix(slot.info, slot[name].delta_weight(Host(module, slot)).detach()).float()
    return out


def reload(model, directory):
    fresh = copy.deepcopy(model)
    deltatune.detach(fresh)
    deltatune.load(fresh, directory, name="result")
    return fresh, dense_updates(fresh, "result")


def test_lora_sum_and_negation_are_exact_in_factor_space(model_with_adapters, tmp_path):
    model = model_with_adapters
    result = combine(model, ["a", "b"], weights=[1.0, -0.5], out=tmp_path / "ab")
    assert result.space == "factor" and result.kind == "lora" and result.relative_error == 0
    _, got = reload(model, tmp_path / "ab")
    a, b = dense_updates(model, "a"), dense_updates(model, "b")
    assert set(got) == set(a) | set(b)
    for path, update in got.items():
        expected = a.get(path, 0) - 0.5 * b.get(path, 0)
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-4)
    ranks = {m.path: m.rank for m in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 2
    assert set(deltatune.adapters(model)) == {"a", "b", "c", "d"}  # the model is left as it was


def test_refactorised_rank_is_the_best_rank_k_approximation(model_with_adapters, tmp_path):
    model = model_with_adapters
    result = combine(model, ["a", "b"], out=tmp_path / "r3", rank=3)
    _, got = reload(model, tmp_path / "r3")
    a, b = dense_updates(model, "a"), dense_updates(model, "b")
    for path, update in got.items():
        exact = a.get(path, 0) + b.get(path, 0)
        s = torch.linalg.svdvals(exact.double())
        best = float(s[3:].square().sum().sqrt())  # Eckart–Young: the optimal rank-3 error
        assert abs(float((update.double() - exact.double()).norm()) - best) < 1e-4 * float(s[0])
        module_error = next(m.relative_error for m in result.modules if m.path == path)
        assert abs(module_error - best / float(s.square().sum().sqrt())) < 1e-4


def test_any_mergeable_methods_combine_in_weight_space(model_with_adapters, tmp_path):
    model = model_with_adapters
    result = combine(model, ["a", "c", "d"], method="ties", params={"density": 0.5}, weights=[1.0, 0.5, 2.0],
                     out=tmp_path / "ties")
    assert result.kind == "full" and result.space == "weight"
    _, got = reload(model, tmp_path / "ties")
    updates = [dense_updates(model, n) for n in "acd"]
    ties = get_merge_method("ties")
    for path, update in got.items():
        tensors = [u.get(path, torch.zeros_like(update)) for u in updates]
        expected = ties(tensors, torch.zeros_like(update), density=0.5, weight=[1.0, 0.5, 2.0])
        torch.testing.assert_close(update, expected, atol=1e-6, rtol=1e-5)


def test_combined_adapter_behaves_like_the_formula(model_with_adapters, tmp_path):
    model = model_with_adapters
    combine(model, ["a", "c"], weights=[1.0, 1.0], out=tmp_path / "ac", output="full")
    fresh, _ = reload(model, tmp_path / "ac")
    with torch.no_grad(), deltatune.use(model, ["a", "c"]):  # both active: their updates add up
        expected = model(X).logits
    torch.testing.assert_close(fresh(X).logits, expected, atol=1e-4, rtol=1e-4)


def test_convert_any_adapter_to_lora_by_rank_or_energy(model_with_adapters, tmp_path):
    model = model_with_adapters
    by_energy = convert(model, "c", energy=0.9, out=tmp_path / "e90")
    assert by_energy.relative_error <= (1 - 0.9) ** 0.5 + 1e-6 and by_energy.kind == "lora"
    by_rank = convert(model, "d", rank=16, out=tmp_path / "r16")  # LoHa r=2 has rank <= 4: exact at 16
    assert by_rank.relative_error < 1e-5
    _, got = reload(model, tmp_path / "r16")
    for path, update in dense_updates(model, "d").items():
        torch.testing.assert_close(got[path], update, atol=1e-5, rtol=1e-4)
    peft = pytest.importorskip("peft")  # a plain LoRA with per-module ranks: PEFT (hence vLLM's reader) loads it
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(fresh_base(model)), str(tmp_path / "e90"))
    fresh_e, _ = reload(model, tmp_path / "e90")
    torch.testing.assert_close(peft_model(X).logits, fresh_e(X).logits, atol=1e-5, rtol=1e-4)


def fresh_base(model):
    base = copy.deepcopy(model)
    deltatune.detach(base)
    return base


def test_bad_requests_are_one_clear_error(model_with_adapters, tmp_path):
    model = model_with_adapters
    with pytest.raises(DeltatuneError, match="needs rank=... or energy"):
        combine(model, ["a", "c"], method="ties", output="lora", out=tmp_path / "x")
    with pytest.raises(DeltatuneError, match="2 weights for 3 adapters"):
        combine(model, ["a", "b", "c"], weights=[1, 2], out=tmp_path / "x")
    with pytest.raises(DeltatuneError, match="energy must be in"):
        convert(model, "a", energy=1.5, out=tmp_path / "x")
    with pytest.raises(DeltatuneError, match="does not exist"):
        combine(model, [str(tmp_path / "missing")], out=tmp_path / "x")
    deltatune.attach(model, deltatune.config("denselora", targets=["down_proj"]), name="act")
    with pytest.raises(DeltatuneError, match="acts on activations"):
        combine(model, ["a", "act"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists() and set(deltatune.adapters(model)) == {"a", "b", "c", "d", "act"}


def test_federated_aggregation_of_client_loras(model_with_adapters, tmp_path):
    model = model_with_adapters
    result = combine(model, ["a", "b"], method="fedavg", weights=[3.0, 1.0], out=tmp_path / "fed")
    assert result.kind == "lora" and result.space == "factor"
    _, got = reload(model, tmp_path / "fed")
    from deltatune.merging.adapters import read_updates

    a, b = read_updates(model, "a"), read_updates(model, "b")
    path = "model.layers.0.self_attn.q_proj"  # both clients: ranks 4 and 2, zero-padded, weights 3:1
    (a_a, b_a), (a_b, b_b) = a[path].factors, b[path].factors
    a_avg = 0.75 * a_a + 0.25 * torch.nn.functional.pad(a_b, (0, 0, 0, 2))
    b_avg = 0.75 * b_a + 0.25 * torch.nn.functional.pad(b_b, (0, 2))
    torch.testing.assert_close(got[path], b_avg @ a_avg, atol=1e-5, rtol=1e-4)
    with pytest.raises(DeltatuneError, match="not a plain LoRA"):
        combine(model, ["a", "c"], method="fedavg", out=tmp_path / "x")
