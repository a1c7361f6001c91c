"""Targeting semantics (PEFT-compatible) and its errors."""

from __future__ import annotations

import pytest
from torch import nn

import deltatune
from deltatune import DeltatuneError
from deltatune.core.targeting import find_targets, layer_index
from toys import make


def _find(model, **fields):
    spec = deltatune.get_method("lora")
    return find_targets(model, deltatune.config("lora", **fields), spec.accepts, "Linear")


def test_list_matches_exact_or_dotted_suffix():
    model, _ = make("llama")
    found = _find(model, targets=["q_proj", "model.layers.1.self_attn.v_proj"])
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.v_proj"]
    with pytest.raises(DeltatuneError, match="matched no module"):
        _find(model, targets=["_proj"])  # a suffix must start at a dot


def test_regex_is_a_full_match():
    model, _ = make("llama")
    assert _find(model, targets=r".*\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(DeltatuneError):
        _find(model, targets="q_proj")  # not a full match of any path


def test_all_linear_skips_output_head():
    model, _ = make("llama")
    found = _find(model, targets="all-linear")
    assert "lm_head" not in found and len(found) == 2 * 7
    gpt2, _ = make("gpt2")
    found = _find(gpt2, targets="all-linear")
    assert "lm_head" not in found and any(p.endswith("c_attn") for p in found)  # Conv1D counts as linear


def test_exclude_and_layers():
    model, _ = make("llama")
    found = _find(model, targets="all-linear", exclude=["o_proj", "mlp.up_proj"], layers=[1])
    assert found and all(".layers.1." in p for p in found)
    assert not any(p.endswith(("o_proj", "up_proj")) for p in found)
    assert _find(model, targets=["q_proj"], layers=0) == ["model.layers.0.self_attn.q_proj"]
    gpt2, _ = make("gpt2")
    assert _find(gpt2, targets=["c_attn"], layers=[1], layers_pattern="h") == ["transformer.h.1.attn.c_attn"]


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj", None) == 12
    assert layer_index("transformer.h.3.attn", None) == 3
    assert layer_index("encoder.block.2.x", "block") == 2
    assert layer_index("lm_head", None) is None


def test_default_targets_by_model_type():
    model, _ = make("llama")
    assert _find(model) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    mlp, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="no targets given and no default"):
        _find(mlp)


def test_nothing_matched_shows_closest_names():
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match=r"matched no module; closest module names: .*q_proj"):
        _find(model, targets=["q_prj"])
    with pytest.raises(DeltatuneError, match=r"with layers=\[7\]"):
        _find(model, targets=["q_proj"], layers=[7])


def test_container_named_explicitly_is_an_error():
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match=r"'model.layers.0.mlp' is a LlamaMLP, which it cannot adapt"):
        _find(model, targets=["mlp"])


def test_regex_sweeping_containers_keeps_hosts():
    model, _ = make("llama")
    found = _find(model, targets=r"model\.layers\.0\.mlp.*")
    assert found == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_grouped_conv_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(DeltatuneError, match="grouped convolution"):
        deltatune.attach(model, deltatune.config("lora", targets=["0"]))
    assert not hasattr(model, "_deltatune_state")
