"""DenseLoRA: Δh = s·GELU(D·M·GELU(E·x)) with one Encoder-Decoder shared by every layer of a kind (trained and saved
once) and a dense r×r matrix per layer; identity at init; not mergeable; parameter counts (per layer and shared)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import deltatune
from deltatune.core.api import shared_of
import deltatune.methods.denselora  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of

from test_multilora import layer_info, randomize
from toys import make, run

TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama_with(method: str, **fields):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config(method, targets=TARGETS, **fields))
    return model, x


def test_encoder_decoder_is_shared_per_kind_and_the_dense_matrix_per_layer():
    model, _ = llama_with("denselora", r=4)
    layers = model.model.layers
    q0, q1 = layers[0].self_attn.q_proj.deltatune["default"], layers[1].self_attn.q_proj.deltatune["default"]
    v0 = layers[0].self_attn.v_proj.deltatune["default"]
    assert q0.shared[q0.key] is q1.shared[q1.key] and q0.key != v0.key
    assert q0.M is not q1.M
    shared = shared_of(model, "default")
    assert set(shared.keys()) == {"q_proj_16x16", "v_proj_8x16", "down_proj_16x32"}


def test_output_is_the_encoder_dense_decoder_pipeline():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("denselora", r=3, alpha=6.0, targets=["lin1"]))
    delta = model.lin1.deltatune["default"]
    randomize(shared_of(model, "default"), seed=1)
    h = torch.randn(4, 20)
    pair = delta.shared[delta.key]
    expected = 2.0 * F.gelu(F.gelu(h @ pair.lora_A.t()) @ delta.M.t() @ pair.lora_B.t())
    with torch.no_grad():
        torch.testing.assert_close(model.lin1(h), F.linear(h, model.lin1.weight) + expected)


def test_identity_at_init_not_mergeable_and_shared_pair_gets_gradients_from_all_layers():
    model, x = llama_with("denselora", r=4)
    base, _ = make("llama")
    torch.testing.assert_close(run(model, x), run(base, x), atol=0, rtol=0)  # decoder D = 0
    assert not deltatune.get_method("denselora").mergeable
    with pytest.raises(DeltatuneError):
        deltatune.merge(model)
    model.train()
    model(x).logits.pow(2).mean().backward()
    decoder = shared_of(model, "default")["q_proj_16x16"].lora_B
    assert decoder.grad is not None and decoder.grad.abs().max() > 0


def test_shared_pairs_are_saved_once(tmp_path):
    model, x = llama_with("denselora", r=4)
    deltatune.save(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    shared = sorted(k for k in keys if ".deltatune_shared." in f".{k}")
    assert len(shared) == 6  # (E, D) for q_proj, v_proj, down_proj
    assert sum(k.endswith(".M") for k in keys) == 6  # one dense matrix per adapted layer


def test_parameter_counts_per_layer_and_shared():
    cls = deltatune.get_method("denselora").delta
    config = deltatune.config("denselora", r=16)
    assert cls.num_parameters(config, layer_info(), "layer") == 16 * 16
    model, _ = llama_with("denselora", r=4)
    hosts = {path: slot.info for path, _, slot in slots_of(model)}
    per_layer = sum(cls.num_parameters(model_config(model), i, p) for p, i in hosts.items())
    total = per_layer + cls.num_shared_parameters(model_config(model), hosts)
    assert total == sum(p.numel() for p in deltatune.trainable_parameters(model))
    assert cls.num_shared_parameters(model_config(model), hosts) == 4 * ((16 + 16) + (16 + 8) + (32 + 16))


def model_config(model):
    return deltatune.adapters(model)["default"]


def test_bad_rank_names_the_field():
    with pytest.raises(DeltatuneError, match="denselora: r must be > 0"):
        deltatune.config("denselora", r=0)
