"""Weighted composition (live and stored), Arrow routing and description routing over the store."""

from __future__ import annotations

import copy

import pytest
import torch
from analysis_helpers import save_toy_adapter
from toys import make, perturb, run

import deltatune
from deltatune.analysis.compose import compose_lora, weighted, weighted_sum
from deltatune.analysis.routing import ArrowRouter, composed_for_input, routed, routed_generate
from deltatune.core.errors import DeltatuneError
from deltatune.core.hosts import from_matrix, host_info


def _two_adapters():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj", "v_proj", "embed_tokens"]), name="a")
    perturb(model, "a", 0, 0.3)
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["q_proj", "down_proj"]), name="b")
    perturb(model, "b", 1, 0.3)
    return model, x


def _merged_reference(model, names, weights):
    """A plain copy of the model with Σ wᵢ·ΔWᵢ added to its weights."""
    reference = copy.deepcopy(model)
    total = weighted_sum(model, names, weights)
    deltatune.detach(reference)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for path, (_, matrix) in total.items():
            modules[path].weight += from_matrix(host_info(modules[path]), matrix)
    return reference


def test_live_weighted_composition_equals_merging_the_weighted_sum():
    model, x = _two_adapters()
    with weighted(model, ["a", "b"], [0.7, 0.3]):
        live = run(model, x)
    assert deltatune.active(model) == ("b",)  # routing restored afterwards
    torch.testing.assert_close(live, run(_merged_reference(model, ["a", "b"], [0.7, 0.3]), x), atol=1e-5, rtol=0)
    with weighted(model, ["a", "b"], [1.0, 0.0]), torch.no_grad():
        only_a = run(model, x)
    with deltatune.use(model, "a"):
        torch.testing.assert_close(only_a, run(model, x), atol=1e-6, rtol=0)
    with pytest.raises(DeltatuneError, match="one weight per adapter"):
        with weighted(model, ["a", "b"], [1.0]):
            pass
    with pytest.raises(DeltatuneError, match="not attached"), weighted(model, ["a", "zzz"], [1.0, 1.0]):
        pass


def test_composed_lora_is_exact_and_loads_anywhere(tmp_path):
    model, x = _two_adapters()
    built = compose_lora(model, ["a", "b"], [0.7, 0.3], tmp_path / "c")
    assert built["relative_error"] < 1e-6 and built["modules"] == 7 and built["rank"] <= 2 + 4
    fresh, _ = make("llama")
    deltatune.load(fresh, tmp_path / "c")
    torch.testing.assert_close(run(fresh, x), run(_merged_reference(model, ["a", "b"], [0.7, 0.3]), x),
                               atol=1e-5, rtol=0)
    truncated = compose_lora(model, ["a", "b"], [0.7, 0.3], tmp_path / "t", max_rank=1)
    assert truncated["rank"] == 1 and truncated["relative_error"] > 1e-3
    deltatune.attach(model, deltatune.config("bitfit", targets=["q_proj"]), name="bias")
    with pytest.raises(DeltatuneError, match="cannot hold"):
        compose_lora(model, ["bias"], [1.0], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_arrow_router_picks_the_adapter_whose_prototype_aligns_with_each_token():
    protos = [{"m": torch.tensor([1.0, 0.0, 0.0])}, {"m": torch.tensor([0.0, 1.0, 0.0])},
              {"m": torch.tensor([0.0, 0.0, 1.0])}]
    presence = {"m": [True, True, True], "norm": [True, False, True]}
    router = ArrowRouter(protos, {"m": "linear", "norm": "norm"}, presence, top_k=1)
    tokens = torch.tensor([[[5.0, 0.1, 0.0], [0.0, -4.0, 1.0]]])  # the sign of ⟨v, x⟩ does not matter
    weights = router("m", tokens)
    assert weights.shape == (1, 2, 3)
    torch.testing.assert_close(weights[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    two = ArrowRouter(protos, {"m": "linear"}, presence, top_k=2)("m", tokens)
    assert (two[0, 0] > 0).sum() == 2 and two[0, 0, 0] > two[0, 0, 1] and float(two.sum()) == pytest.approx(2.0)
    torch.testing.assert_close(router("norm", tokens), torch.tensor([0.5, 0.0, 0.5]))  # no vector input: uniform
    assert router.usage()[0] == pytest.approx(0.5) and sum(router.usage()) == pytest.approx(1.0)
    with pytest.raises(DeltatuneError, match="top_k"):
        ArrowRouter(protos, {}, presence, top_k=0)


def _store_of_three(store, tmp_path):
    store.add(save_toy_adapter(tmp_path / "json", seed=0, r=2, targets=["q_proj", "v_proj", "embed_tokens"]),
              description="convert sentences about people to json", base_model="toy")
    store.add(save_toy_adapter(tmp_path / "poems", seed=1, r=2), description="write poems", base_model="toy")
    store.add(save_toy_adapter(tmp_path / "hr", seed=2, r=2), group="hr", base_model="toy",
              description="convert sentences about people to json for payroll")


def test_description_routing_composes_the_best_matches_of_visible_adapters(store, tmp_path):
    _store_of_three(store, tmp_path)
    model, x = make("llama")
    with routed(store, model, "convert people to json", groups=["public"], base_model="toy",
                mode="description", top_k=2) as routing:
        out = run(model, x)
        assert len(deltatune.adapters(model)) == 2  # only the chosen ones are loaded
    summary = routing.summary()
    assert [a["name"] for a in summary["adapters"]] == ["json", "poems"]
    assert summary["adapters"][0]["weight"] > summary["adapters"][1]["weight"]
    assert deltatune.adapters(model) == {} and not torch.equal(out, run(model, x))
    with routed(store, model, "people to json for payroll", groups=["hr"], base_model="toy", mode="description",
                top_k=1) as routing:
        pass
    assert [a["name"] for a in routing.summary()["adapters"]] == ["hr"]  # the best match, for those who may see it


def test_arrow_routing_never_loads_what_the_groups_may_not_see(store, tmp_path, monkeypatch):
    _store_of_three(store, tmp_path)
    exported = []
    original = type(store).exported

    def spy(self, ref, groups=None):
        exported.append(ref)
        return original(self, ref, groups)

    monkeypatch.setattr(type(store), "exported", spy)
    model, x = make("llama")
    with routed(store, model, "convert people to json", groups=["public"], base_model="toy", top_k=1) as routing:
        run(model, x)
    assert sorted(exported) == ["json", "poems"] and sorted(routing.candidates) == ["json", "poems"]
    usage = routing.summary()["adapters"]
    assert sum(a["weight"] for a in usage) == pytest.approx(1.0)
    assert store.cached_prototypes(store.show("json")["id"])  # prototypes are cached in the store
    with pytest.raises(DeltatuneError, match="no mergeable adapter"):
        with routed(store, model, "x", groups=["public"], base_model="another-model"):
            pass
    with pytest.raises(DeltatuneError, match="unknown routing mode"):
        with routed(store, model, "x", groups=None, base_model="toy", mode="magic"):
            pass


def test_arrow_with_one_candidate_and_top1_equals_using_that_adapter(store, tmp_path):
    adapter = save_toy_adapter(tmp_path / "only", seed=4, r=2)
    store.add(adapter, base_model="toy")
    model, x = make("llama")
    with routed(store, model, None, groups=None, base_model="toy", top_k=1):
        routed_out = run(model, x)
    deltatune.load(model, adapter)
    torch.testing.assert_close(routed_out, run(model, x), atol=1e-6, rtol=0)


def test_routed_generate_on_a_real_tokenizer(store, tiny_dir, tiny_adapters):
    for name, directory in tiny_adapters.items():
        store.add(directory, description=f"{name} adapter", base_model=str(tiny_dir))
    result = routed_generate(store, str(tiny_dir), "Extract the person as JSON: Ana, 31, Lisbon, nurse.",
                             groups=["public"], top_k=1, max_new_tokens=5, precision="fp32")
    assert isinstance(result["text"], str) and result["mode"] == "arrow"
    assert {a["name"] for a in result["adapters"]} == {"json", "poems"}


def test_cli_compose_cluster_route(tiny_dir, tiny_adapters, tmp_path, capsys, monkeypatch):
    import json

    from analysis_helpers import HashEmbedder

    from deltatune.cli import main

    monkeypatch.setenv("DELTATUNE_STORE", str(tmp_path / "store"))
    monkeypatch.setattr("deltatune.analysis.store.AdapterStore.embedder", property(lambda self: HashEmbedder()))
    for name, directory in tiny_adapters.items():
        assert main(["store", "add", str(directory), "--base-model", str(tiny_dir), "--description", name]) == 0
    assert main(["store", "compose", "json", "poems", "--weights", "0.5,0.5", "--name", "both",
                 "--base", str(tiny_dir)]) == 0
    assert "stored 'both': rank 4" in capsys.readouterr().out
    assert main(["store", "cluster", "--by", "delta", "--base", str(tiny_dir), "--k", "2", "--json"]) == 0
    clusters = json.loads(capsys.readouterr().out)
    assert clusters["k"] == 2 and sorted(sum((c["members"] for c in clusters["clusters"]), [])) == [
        "both", "json", "poems"]
    assert main(["store", "route", "json please", "--base", str(tiny_dir), "--groups", "public",
                 "--max-new-tokens", "3", "--raw", "--json"]) == 0
    routed_result = json.loads(capsys.readouterr().out)
    assert routed_result["mode"] == "arrow" and len(routed_result["adapters"]) == 3
    assert main(["store", "compose", "json", "--weights", "1,2", "--name", "x", "--base", str(tiny_dir)]) == 2
    assert "one weight per adapter" in capsys.readouterr().err


def test_store_arrow_routing_matches_the_arrow_method_over_the_same_experts(store, tmp_path):
    for seed, name in enumerate(["e0", "e1", "e2"]):
        store.add(save_toy_adapter(tmp_path / name, seed=seed, r=2), base_model="toy")
    model, x = make("llama")
    with routed(store, model, None, groups=None, base_model="toy", top_k=2, temperature=0.5) as routing:
        from_store = run(model, x)
    reference, _ = make("llama")
    for name in routing.candidates:
        deltatune.load(reference, tmp_path / name, name=name)
    deltatune.attach(reference, deltatune.config("arrow", experts=routing.candidates, top_k=2, temperature=0.5),
                     name="router")
    with deltatune.use(reference, "router"):
        torch.testing.assert_close(from_store, run(reference, x), atol=1e-5, rtol=0)
    assert not torch.allclose(from_store, run(make("llama")[0], x), atol=1e-4)  # the experts changed the output


def test_composed_for_input_stores_one_servable_lora_per_routing_and_reuses_it(store, tmp_path):
    _store_of_three(store, tmp_path)
    model, x = make("llama")
    ask = {"groups": ["public"], "base_model": "toy", "top_k": 2, "temperature": 1.0}
    first = composed_for_input(store, model, "convert people to json", **ask)
    assert not first["cached"] and first["kind"] == "composed" and first["tags"] == ["routed"]
    assert [a["name"] for a in first["adapters"]] == ["json", "poems"] and first["groups"] == ["public"]
    assert all(round(a["weight"] / 0.05, 6).is_integer() for a in first["adapters"])
    assert deltatune.adapters(model) == {}  # the model is left as it was
    again = composed_for_input(store, model, "convert people to json", **ask)
    assert again["cached"] and again["id"] == first["id"] and len(store.list(tags=["routed"])) == 1
    served, _ = make("llama")
    deltatune.load(served, store.export(first["name"], tmp_path / "served"))
    weights = [a["weight"] for a in first["adapters"]]
    with routed(store, model, "convert people to json", mode="description", **ask) as routing:
        names = routing.candidates
    assert names == ["json", "poems"]  # the cached composition is never a routing candidate itself
    reference, _ = make("llama")
    for name in names:
        deltatune.load(reference, tmp_path / name, name=name)
    with weighted(reference, names, weights):
        torch.testing.assert_close(run(served, x), run(reference, x), atol=1e-5, rtol=0)
    assert store.remove("json")["composed_removed"] == [first["name"]]  # removal reaches the cached artefact
    hr = composed_for_input(store, model, "people to json for payroll", groups=["hr"], base_model="toy", top_k=1)
    assert hr["adapters"] == [{"name": "hr", "weight": 1.0}] and hr["groups"] == ["hr"]
    with pytest.raises(DeltatuneError, match="not visible"):
        store.show(hr["name"], ["public"])
