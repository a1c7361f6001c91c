"""Configs: creation by name, field checking, JSON round trip, helpful errors."""

from __future__ import annotations

import json

import pytest

import deltatune
from deltatune import DeltatuneError


def test_config_by_name_and_json_roundtrip():
    cfg = deltatune.config("lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    assert cfg.r == 8 and cfg.alpha == 16.0 and cfg.targets == ["q_proj", "v_proj"]
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["method"] == "lora"
    assert deltatune.config_from_dict(data) == cfg


@pytest.mark.parametrize("method", sorted(deltatune.list_methods()))
def test_every_method_config_roundtrips_at_defaults(method):
    cfg = deltatune.config(method, targets="all-linear")
    assert deltatune.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_method_lists_valid_ones():
    with pytest.raises(DeltatuneError, match=r"unknown method 'lorra'; valid: .*lora"):
        deltatune.config("lorra", r=4)


def test_unknown_field_lists_valid_ones():
    with pytest.raises(DeltatuneError, match=r"unknown field\(s\) rank; valid fields: .*\br\b.*alpha"):
        deltatune.config("lora", rank=4)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"r": "8"}, r"lora.r must be int, got '8'"),
        ({"r": 0}, r"r must be > 0"),
        ({"r": True}, r"lora.r must be int"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"init": "pisa"}, r"lora.init must be 'default' \| 'gaussian' \| 'random' \| 'pissa'"),
        ({"targets": 3}, r"lora.targets must be"),
        ({"targets": []}, r"targets is an empty list"),
        ({"rank_pattern": {"q": "x"}}, r"rank_pattern must be"),
        ({"bias": "all"}, r"bias must be 'none' \| 'lora_only'"),
    ],
)
def test_bad_field_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("lora", **fields)


def test_configs_are_frozen_and_replace_checks():
    cfg = deltatune.config("dora", r=4)
    with pytest.raises(Exception):
        cfg.r = 5
    assert cfg.replace(r=6).r == 6
    with pytest.raises(DeltatuneError, match="unknown field"):
        cfg.replace(rank=6)
    with pytest.raises(DeltatuneError, match="lora_bias=True is not supported with DoRA"):
        deltatune.config("dora", lora_bias=True)


def test_from_dict_needs_method():
    with pytest.raises(DeltatuneError, match="'method' key"):
        deltatune.config_from_dict({"r": 4})


def test_rslora_is_lora_with_rank_stable_scaling():
    assert deltatune.config("rslora", r=16, alpha=8).scaling_for("x") == pytest.approx(8 / 4)
    assert deltatune.config("lora", r=16, alpha=8).scaling_for("x") == pytest.approx(8 / 16)
    assert deltatune.config("lora", r=16, alpha=8, use_rslora=True).scaling_for("x") == pytest.approx(2.0)


def test_rank_and_alpha_patterns_follow_peft_rule():
    cfg = deltatune.config("lora", r=8, alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\..*": 4},
                           alpha_pattern={"q_proj": 32})
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert cfg.rank_for("model.layers.1.mlp.up_proj") == 4
    assert cfg.rank_for("model.layers.0.mlp.up_proj") == 8
    assert cfg.rank_for("model.layers.0.self_attn.xv_proj") == 8  # suffix must start at a dot
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(32 / 8)
