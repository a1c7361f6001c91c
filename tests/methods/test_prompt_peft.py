"""PEFT parity for prompt tuning, P-tuning and prefix tuning, both ways, on the tiny Llama (and GPT-2).

PEFT stores a prompt-learning adapter as one top-level tensor `prompt_embeddings` (no `base_model.model.` prefix).
Until deltatune's io maps that key (matrix_rows/prompt.py: IO_PLACES_BARE_KEYS), these tests rename it on the way;
everything else is checked as is: config mapping, tensor layout, and logits."""

from __future__ import annotations

import pytest
import torch
from matrix_rows.prompt import IO_PLACES_BARE_KEYS
from peft_roundtrip import peft, randomise
from safetensors.torch import load_file, save_file
from toys import make, perturb, run

import deltatune
import deltatune.methods.prefix
import deltatune.methods.prompt
import deltatune.methods.ptuning

P = 3
CASES = [
    ("prompt_tuning", "PromptTuningConfig", {}, {}),
    ("p_tuning", "PromptEncoderConfig", {"encoder_hidden_size": 8}, {"encoder_hidden_size": 8}),
    ("p_tuning", "PromptEncoderConfig", {"encoder_hidden_size": 6, "encoder_reparameterization_type": "LSTM"},
     {"encoder_hidden_size": 6, "encoder_reparameterization_type": "LSTM"}),
    ("prefix_tuning", "PrefixTuningConfig", {}, {}),
    ("prefix_tuning", "PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 8},
     {"prefix_projection": True, "encoder_hidden_size": 8}),
]
IDS = ["prompt_tuning", "p_tuning-mlp", "p_tuning-lstm", "prefix", "prefix-projection"]


def _real_positions(method: str, logits: torch.Tensor) -> torch.Tensor:
    """PEFT's logits include the virtual input positions (not prefix tuning's, which live in the cache)."""
    return logits if method == "prefix_tuning" else logits[:, P:]


def _rename_keys(path, body: str, to_peft: bool) -> None:
    """The one key mapping io does once it knows bare keys: PEFT's bare keys <-> `base_model.model.<body>.` keys."""
    if IO_PLACES_BARE_KEYS:
        return
    prefix = f"base_model.model.{body}."
    tensors = load_file(path)
    save_file({(k.removeprefix(prefix) if to_peft else prefix + k): v for k, v in tensors.items()}, path)


def _body(model) -> str:
    return next(p for p, m in model.named_modules() if m is model.base_model)


@pytest.mark.parametrize("toy", ["llama", "gpt2"])
@pytest.mark.parametrize("method,peft_class,peft_fields,ours", CASES, ids=IDS)
def test_peft_saved_adapter_loads_with_peft_logits(method, peft_class, peft_fields, ours, toy, tmp_path):
    model, x = make(toy)
    config = getattr(peft, peft_class)(task_type="CAUSAL_LM", num_virtual_tokens=P, **peft_fields)
    peft_model = peft.get_peft_model(model, config)
    randomise(peft_model, seed=1, scale=0.5)
    peft_model.eval()
    expected = _real_positions(method, run(peft_model, x))
    peft_model.save_pretrained(tmp_path / "p")
    ours_model, _ = make(toy)
    _rename_keys(tmp_path / "p" / "adapter_model.safetensors", _body(ours_model), to_peft=False)
    deltatune.load(ours_model, tmp_path / "p")
    torch.testing.assert_close(run(ours_model, x), expected, atol=1e-5, rtol=1e-5)
    loaded = deltatune.adapters(ours_model)["default"]
    assert loaded.method == method and loaded.num_virtual_tokens == P
    if method != "prompt_tuning":  # PEFT keeps only the encoder's outputs: they load as the flat table
        assert getattr(loaded, "reparameterize", False) is False and not getattr(loaded, "prefix_projection", False)


@pytest.mark.parametrize("toy", ["llama", "gpt2"])
@pytest.mark.parametrize("method,peft_class,peft_fields,ours", CASES, ids=IDS)
def test_deltatune_saved_adapter_loads_in_peft(method, peft_class, peft_fields, ours, toy, tmp_path):
    model, x = make(toy)
    deltatune.attach(model, deltatune.config(method, num_virtual_tokens=P, **ours))
    perturb(model, "default", seed=2, scale=0.5)
    expected = run(model, x)
    deltatune.save(model, tmp_path / "a")
    _rename_keys(tmp_path / "a" / "adapter_model.safetensors", _body(model), to_peft=True)
    fresh, _ = make(toy)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "a")
    assert type(peft_model.peft_config["default"]).__name__ == peft_class
    torch.testing.assert_close(_real_positions(method, run(peft_model, x)), expected, atol=1e-5, rtol=1e-5)


def test_same_weights_same_logits_while_training_prefix_projection():
    """Not only through files: the reparameterised prefix (MLP over a smaller table) computes what PEFT's does."""
    model, x = make("llama")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                     encoder_hidden_size=8)
    peft_model = peft.get_peft_model(make("llama")[0], config)
    randomise(peft_model, seed=3, scale=0.5)
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=P, prefix_projection=True,
                                             encoder_hidden_size=8))
    encoder = model.base_model.deltatune["default"].prompt_encoder
    encoder.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    torch.testing.assert_close(run(model, x), run(peft_model, x), atol=1e-5, rtol=1e-5)
