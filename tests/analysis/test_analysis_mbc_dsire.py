"""MBC clustering of stored adapters, and DSiRe dataset-size estimates (synthetic and trained end to end)."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import save_toy_adapter
from toys import make, perturb

import deltatune
from deltatune.analysis import dsire
from deltatune.analysis.inspect import inspect
from deltatune.analysis.mbc import cluster, cluster_matrix
from deltatune.cli import main
from deltatune.core.errors import DeltatuneError


def _families(store, tmp_path, method: str = "lora") -> None:
    """Two families of three adapters each: a shared family direction plus a little individual noise."""
    for family in range(2):
        for member in range(3):
            model, _ = make("llama")
            name = f"f{family}_{member}"
            deltatune.attach(model, deltatune.config(method, r=2, targets=["q_proj", "v_proj"]), name=name)
            perturb(model, name, 100 + family, 0.5)
            perturb(model, name, 10 * family + member, 0.15)
            store.add(deltatune.save(model, tmp_path / name, name=name), base_model="toy")


@pytest.mark.parametrize("by", ["params", "delta"])
def test_mbc_recovers_the_families(store, tmp_path, by):
    _families(store, tmp_path)
    result = cluster(store, by=by, model=make("llama")[0] if by == "delta" else None)
    assert result["k"] == 2 and result["silhouette"] > 0.5
    assert sorted(sorted(c["members"]) for c in result["clusters"]) == [["f0_0", "f0_1", "f0_2"],
                                                                      ["f1_0", "f1_1", "f1_2"]]
    assert all(c["mean_similarity"] > 0.5 for c in result["clusters"])
    json.dumps(result)


def test_mbc_errors_and_fixed_k(store, tmp_path):
    store.add(save_toy_adapter(tmp_path / "a", r=2), base_model="toy")
    with pytest.raises(DeltatuneError, match="at least two"):
        cluster(store)
    store.add(save_toy_adapter(tmp_path / "b", method="loha", r=2), base_model="toy")
    with pytest.raises(DeltatuneError, match="different parameter layouts"):
        cluster(store)
    mixed = cluster(store, by="delta", model=make("llama")[0], k=1)  # ΔW compares across methods
    assert mixed["k"] == 1 and mixed["clusters"][0]["members"] == ["a", "b"]
    with pytest.raises(DeltatuneError, match="needs the base model"):
        cluster(store, by="delta")
    with pytest.raises(DeltatuneError, match="k must be between"):
        cluster_matrix(torch.eye(2), ["x", "y"], k=3)


def _features(scale: float) -> dict:
    return {"l0": [scale, scale / 2], "l1": [2 * scale, scale / 3]}


def test_dsire_majority_vote_on_synthetic_features():
    model = dsire.fit([(_features(1.0), 10), (_features(2.0), 100), (_features(4.0), 1000)], values=2)
    assert dsire.predict(model, _features(2.2))["estimate"] == 100
    mixed = {"l0": [1.1, 0.5], "l1": [8.5, 1.33]}  # one layer says 10 (distance 0.1), the other 1000 (0.5)
    result = dsire.predict(model, mixed)
    assert result["agreement"] == 0.5 and result["estimate"] == 10  # tie: the nearer winning layer
    with pytest.raises(DeltatuneError, match="two different sizes"):
        dsire.fit([(_features(1.0), 10), (_features(2.0), 10)])
    with pytest.raises(DeltatuneError, match="adapts none"):
        dsire.predict(model, {"other": [1.0, 1.0]})


def test_calibration_file_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"adapter": "a", "size": 0}]')
    with pytest.raises(DeltatuneError, match="entry 0"):
        dsire.read_calibration_file(path)
    path.write_text("{not json")
    with pytest.raises(DeltatuneError, match="cannot read it as JSON"):
        dsire.read_calibration_file(path)


def test_dsire_end_to_end_on_adapters_trained_from_the_demo_task(tiny_dir, tmp_path, capsys):
    calibration = dsire.train_calibration_set(tmp_path / "cal", [2, 16], [0, 1], model=str(tiny_dir), epochs=1)
    entries = dsire.read_calibration_file(calibration)
    assert [size for _, size in entries] == [2, 2, 16, 16]
    base = deltatune.analysis.deltas.load_base_model(str(tiny_dir))
    fitted = dsire.calibrate(entries, base)
    assert fitted["leave_one_out"]["accuracy"] == 1.0  # every adapter's size recovered with itself held out
    result = inspect(entries[-1][0], base, calibration=fitted)
    assert result["dataset_size"]["estimate"] == 16
    assert main(["inspect", str(entries[0][0]), "--base", str(tiny_dir), "--calibration", str(calibration),
                 "--no-intruders"]) == 0
    assert "DSiRe estimate: 2 training examples" in capsys.readouterr().out
