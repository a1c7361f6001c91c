"""PEFT as the oracle: adapters saved by PEFT load into deltatune with PEFT's outputs, and the other way round."""

from __future__ import annotations

import pytest
import torch

import deltatune
from toys import make, perturb, run

peft = pytest.importorskip("peft")

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


def _randomise_peft(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (".base_layer.bias" in name and p.requires_grad):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("variant,toy", CASES)
def test_peft_saved_loads_in_deltatune(variant, toy, tmp_path):
    _, peft_kwargs, _, _ = variant
    model, x = make(toy)
    cfg = peft.LoraConfig(target_modules=TARGETS[toy], init_lora_weights=False, **peft_kwargs)
    peft_model = peft.get_peft_model(model, cfg)
    _randomise_peft(peft_model, 0)
    peft_model.eval()
    expected = run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "p")

    ours, _ = make(toy)
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,toy", CASES)
def test_deltatune_saved_loads_in_peft(variant, toy, tmp_path):
    _, _, method, fields = variant
    model, x = make(toy)
    deltatune.attach(model, deltatune.config(method, targets=TARGETS[toy], **fields))
    perturb(model, "default", seed=0)
    expected = run(model, x)
    deltatune.save(model, tmp_path / "d")

    fresh, _ = make(toy)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "d").eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)


def test_peft_mixed_batch_matches_deltatune_per_sample(tmp_path):
    """PEFT's adapter_names batches and deltatune's per_sample agree row by row."""
    model, x = make("llama")
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, r=4, lora_alpha=8)
    pm = peft.get_peft_model(model, cfg, adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, r=2))
    _randomise_peft(pm, 1)
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
