"""Save/load: the on-disk layout, atomicity, and one clear error (model unchanged) for every kind of bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune import DeltatuneError
from deltatune.core.io import atomic_write_files
from toys import make, perturb, run


def _saved(tmp_path, toy="llama", method="lora", **fields):
    model, x = make(toy)
    fields = {"r": 4, "targets": ["q_proj", "v_proj"], **fields}
    deltatune.attach(model, deltatune.config(method, **fields))
    perturb(model, "default", 0)
    path = deltatune.save(model, tmp_path / "adapter")
    return path, run(model, x)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    state, flags = snap
    assert not hasattr(model, "_deltatune_state")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_layout_is_peft(tmp_path):
    path, _ = _saved(tmp_path)
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj"))
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys


def test_load_is_not_trainable_by_default(tmp_path):
    path, _ = _saved(tmp_path)
    model, _ = make("llama")
    deltatune.load(model, path)
    assert deltatune.trainable_parameters(model) == []
    model2, _ = make("llama")
    deltatune.load(model2, path, trainable=True)
    assert len(deltatune.trainable_parameters(model2)) == 8


def test_saving_over_an_existing_adapter_replaces_it(tmp_path):
    path, _ = _saved(tmp_path)
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("dora", r=2, targets=["v_proj"]))
    perturb(model, "default", 3)
    deltatune.save(model, path)
    fresh, _ = make("llama")
    deltatune.load(fresh, path)
    assert deltatune.adapters(fresh)["default"].method == "dora"
    torch.testing.assert_close(run(fresh, x), run(model, x))
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.core.io._write_synced", boom)
    with pytest.raises(OSError):
        atomic_write_files(tmp_path / "new", {"a": b"1"})
    assert os.listdir(tmp_path) == []


def test_save_to_a_file_path_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("lora", targets=["lin0"]))
    with pytest.raises(DeltatuneError, match="exists and is not a directory; choose another path"):
        deltatune.save(model, tmp_path / "f")


def test_unknown_adapter_name_on_save(tmp_path):
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("lora", targets=["lin0"]))
    with pytest.raises(DeltatuneError, match="unknown adapter 'x'; valid: default"):
        deltatune.save(model, tmp_path / "a", name="x")


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("no_dir", "does not exist"),
        ("no_config", "is not an adapter directory: it has no adapter_config.json"),
        ("no_weights", "has no adapter_model.safetensors"),
        ("pickle_only", "deltatune never unpickles"),
        ("truncated", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
        ("bad_json", "not valid JSON"),
        ("unknown_peft_type", "PEFT type 'NOPE' is not supported"),
        ("unsupported_peft_field", "layer_replication"),
        ("shape", r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 7\) "
                  r"but the model needs \(4, 16\)"),
        ("missing_tensor", "missing tensor base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
        ("extra_tensor", "unexpected tensor"),
        ("missing_module", "targets modules missing from this model: model.layers.9.self_attn.q_proj"),
    ],
)
def test_bad_adapter_directories(tmp_path, breakage, message):
    path, _ = _saved(tmp_path)
    weights, cfg_file = path / "adapter_model.safetensors", path / "adapter_config.json"
    tensors = load_file(weights)
    cfg = json.loads(cfg_file.read_text())
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if breakage == "no_dir":
        path = tmp_path / "nowhere"
    elif breakage == "no_config":
        cfg_file.unlink()
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "pickle_only":
        weights.rename(path / "adapter_model.bin")
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif breakage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif breakage == "bad_json":
        cfg_file.write_text("{not json")
    elif breakage in ("unknown_peft_type", "unsupported_peft_field"):
        cfg.pop("deltatune", None)
        save_file(tensors, weights)  # drops our metadata, so only the PEFT fields speak
        if breakage == "unknown_peft_type":
            cfg["peft_type"] = "NOPE"
        else:
            cfg["layer_replication"] = [[0, 2]]
        cfg_file.write_text(json.dumps(cfg))
    elif breakage == "shape":
        tensors[key_a] = torch.zeros(4, 7)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif breakage == "missing_tensor":
        del tensors[key_a.replace("lora_A", "lora_B")]
        save_file(tensors, weights)
    elif breakage == "extra_tensor":
        tensors[key_a.replace("lora_A.weight", "lora_C.weight")] = torch.zeros(1)
        save_file(tensors, weights)
    elif breakage == "missing_module":
        tensors[key_a.replace("layers.0", "layers.9")] = tensors[key_a].clone()
        save_file(tensors, weights)
    model, _ = make("llama")
    snap = _snapshot(model)
    with pytest.raises(DeltatuneError, match=message) as info:
        deltatune.load(model, path)
    assert "\n" not in str(info.value)
    _assert_unchanged(model, snap)


def test_failed_load_keeps_other_adapters(tmp_path):
    path, _ = _saved(tmp_path)
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("lora", targets=["down_proj"]), name="mine")
    perturb(model, "mine", 1)
    before = run(model, x)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 7)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(DeltatuneError, match="has shape"):
        deltatune.load(model, path, name="theirs")
    assert list(deltatune.adapters(model)) == ["mine"]
    torch.testing.assert_close(run(model, x), before, atol=0, rtol=0)


def test_load_name_clash(tmp_path):
    path, _ = _saved(tmp_path)
    model, _ = make("llama")
    deltatune.load(model, path)
    with pytest.raises(DeltatuneError, match="already attached; pass name="):
        deltatune.load(model, path)
    deltatune.load(model, path, name="second")
    assert list(deltatune.adapters(model)) == ["default", "second"]
    assert deltatune.active(model) == ("second",)


def test_peft_subdirectories_are_pointed_out(tmp_path):
    path, _ = _saved(tmp_path)
    os.makedirs(tmp_path / "multi")
    os.rename(path, tmp_path / "multi" / "other")
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match="sub-directories: other"):
        deltatune.load(model, tmp_path / "multi")
