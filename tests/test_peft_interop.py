"""PEFT as the oracle: adapters saved by PEFT load into deltatune with PEFT's outputs, and the other way round."""

from __future__ import annotations

import pytest
import torch

import deltatune
from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune, randomise
from toys import make, run

# (id, PEFT LoraConfig kwargs, deltatune method, deltatune fields)
VARIANTS = [
    ("lora", {"r": 4, "lora_alpha": 8}, "lora", {"r": 4, "alpha": 8}),
    ("rslora", {"r": 4, "lora_alpha": 8, "use_rslora": True}, "rslora", {"r": 4, "alpha": 8}),
    ("dora", {"r": 4, "lora_alpha": 8, "use_dora": True}, "dora", {"r": 4, "alpha": 8}),
    ("lora-bias", {"r": 2, "lora_alpha": 4, "lora_bias": True, "bias": "lora_only"}, "lora",
     {"r": 2, "alpha": 4, "lora_bias": True, "bias": "lora_only"}),
    ("lora-pattern", {"r": 2, "lora_alpha": 4, "rank_pattern": {"v_proj": 5, "c_fc": 3}, "alpha_pattern": {"q_proj": 7}},
     "lora", {"r": 2, "alpha": 4, "rank_pattern": {"v_proj": 5, "c_fc": 3}, "alpha_pattern": {"q_proj": 7}}),
]
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "conv": ["conv2d", "conv1d", "head"],
}
CASES = [
    pytest.param(v, toy, id=f"{v[0]}-{toy}")
    for v in VARIANTS
    for toy in TARGETS
    if not (v[0] == "lora-bias" and toy == "llama")  # PEFT refuses lora_bias on embeddings
]


@pytest.mark.parametrize("variant,toy", CASES)
def test_peft_saved_loads_in_deltatune(variant, toy, tmp_path):
    _, peft_kwargs, _, _ = variant
    cfg = peft.LoraConfig(target_modules=TARGETS[toy], init_lora_weights=False, **peft_kwargs)
    peft_saved_loads_in_deltatune(cfg, toy, tmp_path)


@pytest.mark.parametrize("variant,toy", CASES)
def test_deltatune_saved_loads_in_peft(variant, toy, tmp_path):
    _, _, method, fields = variant
    deltatune_saved_loads_in_peft(deltatune.config(method, targets=TARGETS[toy], **fields), toy, tmp_path)


def test_peft_mixed_batch_matches_deltatune_per_sample(tmp_path):
    """PEFT's adapter_names batches and deltatune's per_sample agree row by row."""
    model, x = make("llama")
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, r=4, lora_alpha=8)
    pm = peft.get_peft_model(model, cfg, adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, r=2))
    randomise(pm, seed=1, only="lora_")
    pm.eval()
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        expected = pm(x, adapter_names=names).logits
    pm.save_pretrained(tmp_path / "p")
    ours, _ = make("llama")
    deltatune.load(ours, tmp_path / "p" / "a", name="a")
    deltatune.load(ours, tmp_path / "p" / "b", name="b")
    with deltatune.per_sample(ours, ["a", None, "b"]):
        torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)
