"""Every deterministic mergekit method gives mergekit's tensors on the same tiny models (the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_mergekit
from safetensors.torch import load_file

from deltatune.merging import parse_merge_config, run_merge


def _cases(m0, m1, m2):
    two = [{"model": m1, "parameters": {"weight": 0.3}}, {"model": m2, "parameters": {"weight": 0.7}}]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": m0, "parameters": {"weight": 0.3}}, {"model": m1, "parameters": {"weight": [0.2, 0.9]}},
            {"model": m2, "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": m0, "parameters": {"lambda": 0.8}, "models": [
            {"model": m1, "parameters": {"weight": 0.7}},
            {"model": m2, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.4}]}}]},
        "ties": {"merge_method": "ties", "base_model": m0, "models": [
            {"model": m1, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": m2, "parameters": {"weight": 0.5, "density": [0.3, 0.9]}}]},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": m0, "models": [
            {"model": m1, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.05}},
            {"model": m2, "parameters": {"weight": 0.5, "density": 0.7}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": m0, "parameters": {"normalize": True},
                                 "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.05}},
                                         {"model": m2, "parameters": {"weight": 0.5, "density": 0.7}}]},
        "dare_linear_density_1": {"merge_method": "dare_linear", "base_model": m0, "models": [
            {"model": m1, "parameters": {"weight": 1.0, "density": 1.0}}, {"model": m2, "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": m0, "models": [{"model": m0}, {"model": m1}],
                      "parameters": {"t": [0.0, 0.3, 1.0]}},
        "nuslerp": {"merge_method": "nuslerp", "models": two},
        "nuslerp_rows_base": {"merge_method": "nuslerp", "base_model": m0, "models": two,
                                  "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp", "base_model": m0, "models": two},
        "karcher": {"merge_method": "karcher", "models": [{"model": m0}, {"model": m1}, {"model": m2}]},
        "model_stock": {"merge_method": "model_stock", "base_model": m0, "models": [{"model": m1}, {"model": m2}]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": m0, "parameters": {"filter_wise": True},
                                        "models": [{"model": m1}, {"model": m2}]},
        "sce": {"merge_method": "sce", "base_model": m0, "models": [{"model": m1}, {"model": m2}],
                    "parameters": {"select_topk": 0.5}},
        "nearswap": {"merge_method": "nearswap", "base_model": m0, "models": [{"model": m0}, {"model": m1}],
                         "parameters": {"t": 0.05}},
        "passthrough_slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m1, "layer_range": [0, 2]}]}, {"sources": [{"model": m2, "layer_range": [1, 2]}]}]},
    }


CASES = list(_cases("a", "b", "c"))


@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(case, tiny_models, tmp_path):
    raw = {**_cases(*tiny_models)[case], "dtype": "float32"}
    run_mergekit(raw, tmp_path / "mergekit")
    run_merge(parse_merge_config(raw), tmp_path / "ours")
    theirs, ours = load_file(tmp_path / "mergekit" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=f"{case}: {name}")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_hidden_layers"] == json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"]
