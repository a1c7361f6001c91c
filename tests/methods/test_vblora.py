"""VB-LoRA: every sub-vector of A and B is a top-k softmax admixture of one trained vector bank shared by all layers;
the bank trains and is saved once; top-k storage; parameter count; PEFT parity (Linear and transformers Conv1D)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune
import deltatune.methods.vblora  # noqa: F401
from deltatune import DeltatuneError

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from test_vera import LAYER_576, PEFT_TARGETS, delta_of, needs_shared_keys_at_base_model, peft_and_ours, shared_of
from toys import make, perturb, run, save_and_reload

SMALL = {"r": 3, "num_vectors": 8, "vector_length": 4, "topk": 2, "init_vector_bank_bound": 0.5}


def test_every_sub_vector_is_a_softmax_mix_of_its_top_k_bank_vectors():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("vblora", targets=["lin1"], **SMALL))
    d, bank = delta_of(model, "lin1"), shared_of(model).vblora_vector_bank
    a, b = d.factors(None)  # (3, 20), (20, 3)
    pairs = [(d.vblora_logits_A[i, t], a[i, 4 * t: 4 * t + 4]) for i in range(3) for t in range(5)]
    pairs += [(d.vblora_logits_B[t, i], b[4 * t: 4 * t + 4, i]) for i in range(3) for t in range(5)]
    for logits, sub_vector in pairs:
        top = logits.topk(2)
        weights = torch.softmax(top.values, dim=0)
        torch.testing.assert_close(sub_vector, weights[0] * bank[top.indices[0]] + weights[1] * bank[top.indices[1]])
    torch.testing.assert_close(d.delta_weight(None), b @ a)


def test_the_bank_is_one_trained_parameter_saved_once(tmp_path):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("vblora", targets=["q_proj", "v_proj", "down_proj"], **SMALL))
    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert sum(n.endswith(".deltatune.default.shared.vblora_vector_bank") for n in names) == 1
    model(x).logits.sum().backward()
    assert shared_of(model).vblora_vector_bank.grad.abs().sum() > 0
    deltatune.save(model, tmp_path / "a")
    banks = [k for k in load_file(tmp_path / "a" / "adapter_model.safetensors") if "vector_bank" in k]
    assert len(banks) == 1


def test_a_vector_length_that_does_not_divide_a_layer_cuts_the_last_sub_vector():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("vblora", targets=["lin0", "lin2"], **SMALL))
    d0, d2 = delta_of(model, "lin0"), delta_of(model, "lin2")
    assert tuple(d0.vblora_logits_A.shape) == (3, 3, 8) and tuple(d2.vblora_logits_B.shape) == (1, 3, 8)
    assert tuple(d0.delta_weight(None).shape) == (20, 10) and tuple(d2.delta_weight(None).shape) == (3, 20)


def test_top_k_storage_round_trips_for_inference(tmp_path):
    model, _ = make("gpt2")
    fields = {**SMALL, "topk": 3, "save_only_topk_weights": True}
    deltatune.attach(model, deltatune.config("vblora", targets=["c_attn", "c_fc"], **fields))
    perturb(model, "default", seed=0)
    tensors, fresh = save_and_reload(model, "gpt2", tmp_path, atol=1e-5, rtol=1e-5)  # top-k rounds via exp / log
    indices = tensors["base_model.model.transformer.h.0.attn.c_attn.vblora_logits_A_topk_indices"]
    weights = tensors["base_model.model.transformer.h.0.attn.c_attn.vblora_logits_A_topk_weights"]
    assert indices.dtype == torch.uint8 and indices.shape[-1] == 3 and weights.shape[-1] == 2
    assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in tensors)
    loaded = delta_of(fresh, "transformer.h.0.attn.c_attn").vblora_logits_A
    assert (torch.isfinite(loaded).sum(-1) == 3).all()


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("vblora", vector_length=64)  # r = 4, h = 256: logits for 9 + 9 sub-vectors per rank
    spec = deltatune.get_method("vblora")
    assert spec.delta.num_parameters(cfg, LAYER_576, "x") == 256 * 4 * (9 + 9) == 18432
    assert spec.delta.num_shared_parameters(cfg, {"x": LAYER_576}) == 256 * 64


@pytest.mark.parametrize("field,value", [("topk", 9), ("vector_length", 0), ("init_vector_bank_bound", 0.0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("vblora", **{**SMALL, field: value})


# ---- PEFT parity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("toy", ["gpt2", "llama"])
def test_same_weights_give_peft_s_logits(toy):
    cfg = peft.VBLoRAConfig(r=3, num_vectors=8, vector_length=4, topk=2, target_modules=PEFT_TARGETS[toy])
    fields = {**SMALL, "targets": PEFT_TARGETS[toy]}
    x, peft_model, ours = peft_and_ours(cfg, "vblora", fields, toy, ("vblora_vector_bank",))
    torch.testing.assert_close(run(ours, x), run(peft_model, x), atol=1e-5, rtol=1e-5)


@needs_shared_keys_at_base_model
@pytest.mark.parametrize("toy,topk_only", [("gpt2", False), ("llama", False), ("llama", True)])
def test_peft_saved_vblora_loads_in_deltatune(toy, topk_only, tmp_path):
    cfg = peft.VBLoRAConfig(r=3, num_vectors=8, vector_length=4, topk=2, target_modules=PEFT_TARGETS[toy],
                            save_only_topk_weights=topk_only)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path)


@needs_shared_keys_at_base_model
@pytest.mark.parametrize("toy,topk_only", [("gpt2", False), ("llama", False), ("gpt2", True)])
def test_deltatune_saved_vblora_loads_in_peft(toy, topk_only, tmp_path):
    fields = {**SMALL, "targets": PEFT_TARGETS[toy], "save_only_topk_weights": topk_only}
    deltatune_saved_loads_in_peft(deltatune.config("vblora", **fields), toy, tmp_path)
