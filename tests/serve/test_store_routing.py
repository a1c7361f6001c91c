"""`deltatune serve --store`: requests for "store:auto" are routed over the adapter store and served as one
composed LoRA, within the server's access groups."""

from __future__ import annotations

import contextlib

import pytest
import torch
from starlette.testclient import TestClient

from deltatune.serve.app import ROUTED_MODEL, Settings, create_app
from deltatune.serve.protocol import Limits
from deltatune.store_routing import store_resolver

TASK = "convert sentences about people to json"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Please {TASK}: Ana, 31."}]
DESCRIPTIONS = {"a0": TASK, "a1": "convert sentences about people to poems", "a2": TASK + " for payroll"}
GROUPS = {"a0": "public", "a1": "public", "a2": "hr"}
KEYWORDS = ("json", "poems", "payroll", "people", "sentences", "convert", "ana")


class HashEmbedder:
    """Counts a few keywords (unit rows): instant, and enough to rank the descriptions above (no MiniLM)."""

    name = "test/keywords"

    def __call__(self, texts):
        rows = torch.tensor([[text.lower().count(word) + 0.01 for word in KEYWORDS] for text in texts])
        return rows / rows.norm(dim=1, keepdim=True)


@pytest.fixture
def adapter_store(tmp_path, tiny_dir, adapter_root):
    """a0 and a1 public, a2 (the best match for TASK) only for group hr."""
    from deltatune.analysis.store import AdapterStore

    with AdapterStore(tmp_path / "store", create=True, embedder=HashEmbedder()) as store:
        for name, description in DESCRIPTIONS.items():
            store.add(adapter_root / name, name=name, description=description, group=GROUPS[name],
                      base_model=str(tiny_dir))
    return tmp_path / "store"


@pytest.fixture
def routed_client(make_engine, adapter_store, tiny_dir, tmp_path):
    """Servers over the tiny model routing over `adapter_store` for the given access groups."""
    with contextlib.ExitStack() as running:
        def make(groups=("public",), top_k=2) -> TestClient:
            engine = make_engine(max_loaded=2)
            resolver = store_resolver(adapter_store, groups, str(tiny_dir), top_k, engine.model,
                                      embedder=HashEmbedder(), export_dir=tmp_path / f"exports-{'-'.join(groups)}")
            settings = Settings(base_name="tiny", limits=Limits(max_tokens=16, max_context=256), resolver=resolver)
            return running.enter_context(TestClient(create_app(engine, settings)))

        yield make


def chat(client, model=ROUTED_MODEL, **extra):
    return client.post("/v1/chat/completions",
                       json={"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, **extra})


def reference_text(tiny_dir, adapter_root, names, weights) -> str:
    """Greedy text of the live weighted composition of the source adapters (no store, no server)."""
    import deltatune
    from deltatune.analysis.compose import weighted
    from deltatune.train.interactive import generate_text, load_for_inference, prompt_ids

    model, tokenizer, _ = load_for_inference(str(tiny_dir), None, "fp32")
    for name in names:
        deltatune.load(model, adapter_root / name, name=name)
    with weighted(model, names, weights):
        return generate_text(model, tokenizer, prompt_ids(tokenizer, CHAT), max_new_tokens=8, greedy=True)


def test_routed_request_answers_as_the_composed_adapter_and_the_live_composition(
        routed_client, adapter_store, tiny_dir, adapter_root):
    from deltatune.analysis.store import AdapterStore

    client = routed_client()
    served_a0 = chat(client, model="a0").json()["choices"][0]["message"]["content"]  # loaded while composing
    routed = chat(client)
    assert routed.status_code == 200, routed.text
    name = routed.headers["x-deltatune-adapter"]
    text = routed.json()["choices"][0]["message"]["content"]
    assert routed.json()["model"] == ROUTED_MODEL and name.startswith("routed-")

    with AdapterStore(adapter_store, embedder=HashEmbedder()) as store:
        entry = store.show(name, ["public"])
        sources = entry["derived_from"]
        assert entry["groups"] == ["public"] and {s["name"] for s in sources} == {"a0", "a1"}  # never hr's a2
        assert len(store.list(tags=["routed"])) == 1

    assert text != chat(client, model="tiny").json()["choices"][0]["message"]["content"]  # the adapters act
    direct = chat(client, model=name)
    assert direct.status_code == 200 and direct.json()["choices"][0]["message"]["content"] == text
    assert text == reference_text(tiny_dir, adapter_root, [s["name"] for s in sources],
                                  [s["weight"] for s in sources])
    again = chat(client, stream=True)  # cached: the same adapter, streamed
    assert again.status_code == 200 and again.headers["x-deltatune-adapter"] == name
    with AdapterStore(adapter_store, embedder=HashEmbedder()) as store:
        assert len(store.list(tags=["routed"])) == 1
    assert chat(client, model="a0").json()["choices"][0]["message"]["content"] == served_a0
    assert {a["name"] for a in client.app.state.engine.adapters.listing()} == {"a0", name}


def test_groups_that_see_nothing_get_a_json_error_and_load_nothing(routed_client, adapter_store):
    from deltatune.analysis.store import AdapterStore

    with AdapterStore(adapter_store, embedder=HashEmbedder()) as store:
        for name in ("a0", "a1"):
            store.remove(name)  # left: a2, for group hr only
    client = routed_client(groups=["interns"])
    response = chat(client)
    assert response.status_code == 422 and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert "no adapter could be routed" in error["message"] and "visible to groups ['interns']" in error["message"]
    assert error["param"] == "model" and error["code"] == "no_routed_adapter"
    assert client.app.state.engine.adapters.listing() == []
    assert client.get("/health").json()["in_flight"] == 0  # the refused request left the gate
    assert chat(client, model="tiny").status_code == 200  # the server keeps serving

    hr = chat(routed_client(groups=["hr"]))
    assert hr.status_code == 200
    with AdapterStore(adapter_store, embedder=HashEmbedder()) as store:
        assert store.show(hr.headers["x-deltatune-adapter"], ["hr"])["derived_from"] == [{"name": "a2", "weight": 1.0}]


def test_models_lists_the_routed_name_only_with_a_store(routed_client, client_for_base):
    with_store = routed_client()
    ids = [card["id"] for card in with_store.get("/v1/models").json()["data"]]
    assert ids == ["tiny", ROUTED_MODEL]
    assert with_store.get(f"/v1/models/{ROUTED_MODEL}").json()["parent"] == "tiny"
    without = client_for_base
    assert ROUTED_MODEL not in [card["id"] for card in without.get("/v1/models").json()["data"]]
    assert without.get(f"/v1/models/{ROUTED_MODEL}").status_code == 404
    assert chat(without).status_code == 404


@pytest.fixture
def client_for_base(make_engine):
    client = TestClient(create_app(make_engine(), Settings(base_name="tiny")))
    with client:
        yield client


def test_cli_serve_store_fails_at_start_up_without_a_store(tiny_dir, tmp_path, capsys):
    from deltatune.cli import main

    assert main(["serve", "--base", str(tiny_dir), "--store", str(tmp_path / "missing")]) == 2
    assert "no adapter store" in capsys.readouterr().err
    assert main(["serve", "--base", str(tiny_dir), "--store", str(tmp_path), "--store-groups", " , "]) == 2
    assert "--store-groups" in capsys.readouterr().err
