"""The adapter store: content-addressed blobs, metadata, search, access groups, removal, export, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from analysis_helpers import HashEmbedder, save_toy_adapter
from toys import make, run

import deltatune
from deltatune.analysis.store import AdapterStore
from deltatune.cli import main
from deltatune.core.errors import DeltatuneError


def _blobs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def test_add_show_export_round_trip(store, tmp_path):
    adapter = save_toy_adapter(tmp_path / "people", seed=3)
    entry = store.add(adapter, description="turns sentences about people into JSON", tags=["json", "demo"],
                      metrics={"exact_match": 0.94}, owner="ana", base_model="toy-llama")
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert entry["name"] == "people" and entry["method"] == "lora" and entry["kind"] == "adapter"
    assert entry["blob"] == hashlib.sha256(weights).hexdigest()
    assert Path(entry["blob_path"]).read_bytes() == weights  # content-addressed, byte for byte
    assert entry["tags"] == ["demo", "json"] and entry["groups"] == ["public"] and entry["owner"] == "ana"
    assert entry["metrics"] == {"exact_match": 0.94} and entry["parameters"] == 2 * 8 * ((16 + 16) + (16 + 8))
    assert store.show(entry["id"][:10])["name"] == "people"  # an id prefix works too
    out = store.export("people", tmp_path / "exported")
    original, x = make("llama")
    deltatune.load(original, adapter)
    exported, _ = make("llama")
    deltatune.load(exported, out)
    assert (run(exported, x) == run(original, x)).all()


def test_duplicates_and_bad_input_write_nothing(store, tmp_path):
    adapter = save_toy_adapter(tmp_path / "a")
    store.add(adapter)
    with pytest.raises(DeltatuneError, match="already stored as 'a'"):
        store.add(adapter, name="again")
    with pytest.raises(DeltatuneError, match="already has an adapter named 'a'"):
        store.add(save_toy_adapter(tmp_path / "other" / "a", seed=5))
    with pytest.raises(DeltatuneError, match="does not exist"):
        store.add(tmp_path / "missing")
    with pytest.raises(DeltatuneError, match="non-empty string without commas"):
        store.add(save_toy_adapter(tmp_path / "b", seed=6), tags=["x,y"])
    assert [e["name"] for e in store.list()] == ["a"] and len(_blobs(store.root)) == 1
    with pytest.raises(DeltatuneError, match="not in the store"):
        store.show("nope")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(DeltatuneError, match="not empty"):
        store.export("a", tmp_path / "busy")
    with pytest.raises(DeltatuneError, match="not an adapter store"):
        AdapterStore(tmp_path / "busy", create=True)
    with pytest.raises(DeltatuneError, match="no adapter store"):
        AdapterStore(tmp_path / "nothing-here")


def test_search_by_text_base_method_and_tags(store, tmp_path):
    store.add(save_toy_adapter(tmp_path / "json", seed=0), description="extract people into json records",
              tags=["json"], base_model="toy-llama")
    store.add(save_toy_adapter(tmp_path / "poems", seed=1), description="write short poems about the sea",
              tags=["creative"], base_model="toy-llama")
    store.add(save_toy_adapter(tmp_path / "loha", method="loha", seed=2, r=2), description="poems in loha",
              base_model="other-base")
    assert [e["name"] for e in store.search("sea poems", limit=2)][0] == "poems"
    assert [e["name"] for e in store.search("people json records")][0] == "json"
    assert [e["name"] for e in store.list(base_model="toy-llama")] == ["json", "poems"]
    assert [e["name"] for e in store.list(method="loha")] == ["loha"]
    assert [e["name"] for e in store.search("poems", tags=["creative"])] == ["poems"]
    assert store.search("poems", base_model="nothing") == []


def test_access_groups_filter_every_query(store, tmp_path):
    store.add(save_toy_adapter(tmp_path / "open", seed=0), description="open notes")
    store.add(save_toy_adapter(tmp_path / "hr", seed=1), description="salary notes", group="hr")
    assert [e["name"] for e in store.list(groups=["public"])] == ["open"]
    assert [e["name"] for e in store.list(groups=["hr"])] == ["open", "hr"]  # oldest first
    assert [e["name"] for e in store.list()] == ["open", "hr"]  # the owner's view
    assert [e["name"] for e in store.search("salary notes", groups=["sales"])] == ["open"]
    for call in (lambda: store.show("hr", ["sales"]), lambda: store.export("hr", tmp_path / "x", ["sales"]),
                 lambda: store.remove("hr", ["sales"])):
        with pytest.raises(DeltatuneError, match="not visible to your groups"):
            call()
    assert not (tmp_path / "x").exists() and len(store.list()) == 2


def test_remove_deletes_blob_and_derived_artefacts_and_says_so(store, tmp_path):
    from deltatune.analysis.library import compose_into_store

    store.add(save_toy_adapter(tmp_path / "a", seed=0), base_model="toy")
    store.add(save_toy_adapter(tmp_path / "b", seed=1), base_model="toy", group="hr")
    store.add(save_toy_adapter(tmp_path / "c", seed=2), base_model="toy")
    model, _ = make("llama")
    composed = compose_into_store(store, model, ["a", "b"], [0.5, 0.5], name="ab")
    assert composed["kind"] == "composed" and composed["groups"] == ["hr"]  # visible only where both sources are
    assert [e["name"] for e in store.list(groups=["public"])] == ["a", "c"]
    compose_into_store(store, model, ["ab", "c"], [1.0, 1.0], name="abc")
    assert store.show("a")["composed_into"] == ["ab"]
    blob_a, blob_ab = store.show("a")["blob_path"], store.show("ab")["blob_path"]
    report = store.remove("a")
    assert report["removed"] == "a" and report["composed_removed"] == ["ab", "abc"]
    assert blob_a in report["blobs_deleted"] and blob_ab in report["blobs_deleted"]
    assert not Path(blob_a).exists() and not Path(blob_ab).exists()
    assert [e["name"] for e in store.list()] == ["b", "c"] and len(_blobs(store.root)) == 2
    assert store.show("b")["composed_into"] == []


def test_orphan_blobs_are_collected_when_the_store_opens(store, tmp_path, embedder):
    store.add(save_toy_adapter(tmp_path / "a"))
    stray = store.blob_path("f" * 64)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by a crash")
    (store.root / "blobs" / ".tmp-123").write_bytes(b"half")
    store.close()
    reopened = AdapterStore(store.root, embedder=embedder)
    assert [p.name for p in _blobs(reopened.root)] == [f"{reopened.list()[0]['blob']}.safetensors"]
    reopened.close()


def test_a_process_killed_mid_add_leaves_no_entry_and_no_blob(tmp_path):
    adapter = save_toy_adapter(tmp_path / "victim")
    root, marker = tmp_path / "store", tmp_path / "inside"
    AdapterStore(root, create=True, embedder=HashEmbedder()).close()
    script = f"""
import pathlib, sys, time
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
import deltatune.analysis.store as store_module
from analysis_helpers import HashEmbedder
def pause():  # inside the transaction: rows inserted, blob on disk, not committed
    pathlib.Path({str(marker)!r}).write_text("inside")
    time.sleep(120)
store_module._inside_add_transaction = pause
store_module.AdapterStore({str(root)!r}, embedder=HashEmbedder()).add({str(adapter)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the add never reached its transaction"
        time.sleep(0.05)
    assert len(_blobs(root)) == 1  # the blob was written before the kill
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with AdapterStore(root, embedder=HashEmbedder()) as store:
        assert store.list() == []  # no half entry
        assert _blobs(root) == []  # and the orphaned blob is gone
        assert store.add(adapter)["name"] == "victim"  # the store works normally afterwards
        assert len(_blobs(root)) == 1


def test_minilm_search_ranks_by_meaning(tmp_path):
    with AdapterStore(tmp_path / "s", create=True) as store:  # the embedded all-MiniLM-L6-v2, offline
        store.add(save_toy_adapter(tmp_path / "extract", seed=0),
                  description="Turns a sentence about a person into a JSON record with name, age, city and job.")
        store.add(save_toy_adapter(tmp_path / "verse", seed=1), description="Writes rhyming poetry about nature.")
        hits = store.search("structured data extraction from text about people")
        assert [h["name"] for h in hits] == ["extract", "verse"] and hits[0]["score"] > hits[1]["score"] + 0.1
        assert len(store.embedding("extract")) == 384
    with pytest.raises(DeltatuneError, match="embeddings come from"):
        AdapterStore(tmp_path / "s", embedder=HashEmbedder()).search("anything")


def test_cli_store_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_STORE", str(tmp_path / "store"))
    monkeypatch.setattr("deltatune.analysis.store.AdapterStore.embedder", property(lambda self: HashEmbedder()))
    save_toy_adapter(tmp_path / "json")
    save_toy_adapter(tmp_path / "secret", seed=1)
    assert main(["store", "add", str(tmp_path / "json"), "--description", "people to json", "--tags", "a,b",
                 "--metrics", '{"exact_match": 0.9}']) == 0
    assert main(["store", "add", str(tmp_path / "secret"), "--group", "hr", "--json"]) == 0
    capsys.readouterr()
    assert main(["store", "list", "--groups", "public"]) == 0
    listed = capsys.readouterr().out
    assert "json" in listed and "secret" not in listed
    assert main(["store", "search", "people json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "json"
    assert main(["store", "show", "secret", "--groups", "public"]) == 2
    assert "not visible to your groups" in capsys.readouterr().err
    assert main(["store", "export", "json", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert main(["store", "remove", "secret"]) == 0
    out = capsys.readouterr().out
    assert "removed 'secret'" in out and ".safetensors" in out
    assert main(["store", "add", str(tmp_path / "missing")]) == 2
