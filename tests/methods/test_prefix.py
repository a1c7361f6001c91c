"""Prefix tuning: trainable key/value positions in front of every attention layer, through the KV cache."""

from __future__ import annotations

import pytest
import torch
from toys import make, perturb, run

import deltatune
import deltatune.methods.prefix
from deltatune import DeltatuneError


def _encoder(model, name="default"):
    return model.base_model.deltatune[name].prompt_encoder


@pytest.mark.parametrize("toy", ["llama", "gpt2"])
def test_output_is_the_base_model_attending_to_the_prefix(toy):
    from transformers import DynamicCache

    model, x = make(toy)
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=3))
    perturb(model, "default", seed=0)
    prefix = _encoder(model).prefix().detach()  # (P, L, 2, H_kv, hd)
    cache = DynamicCache(config=model.config)
    for layer in range(prefix.shape[1]):
        kv = prefix[:, layer].expand(x.shape[0], -1, -1, -1, -1)  # (B, P, 2, H, hd)
        cache.update(kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), layer)
    with deltatune.use(model, None), torch.no_grad():  # real tokens at positions P.., as after P real tokens
        expected = model(x, cache=cache, attention_mask=torch.ones(x.shape[0], 3 + x.shape[1])).logits
    torch.testing.assert_close(run(model, x), expected, atol=1e-6, rtol=0)


def test_layout_and_count_follow_the_key_value_width():
    model, _ = make("llama")  # 2 layers, 2 key/value heads of width 4 (GQA: 4 query heads)
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=3), name="flat")
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=3, prefix_projection=True,
                                             encoder_hidden_size=5), name="mlp")
    assert _encoder(model, "flat").embedding.weight.shape == (3, 2 * 2 * 2 * 4)
    assert _encoder(model, "flat").prefix().shape == (3, 2, 2, 2, 4)
    mlp = _encoder(model, "mlp")
    assert mlp.embedding.weight.shape == (3, 8) and mlp.transform[0].weight.shape == (5, 8)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 8 + (8 * 5 + 5) + (5 * 32 + 32)


def test_a_zero_prefix_still_changes_the_output():
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=2, init="zero"))
    assert _encoder(model).prefix().abs().max() == 0
    assert (run(model, x) - base).abs().max() > 1e-4  # zero keys still take attention mass


def test_gradient_checkpointing_is_refused_in_training_only():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=2))
    model.gradient_checkpointing_enable()
    run(model, x)  # eval, no grad: the cache is kept
    model.train()
    with pytest.raises(DeltatuneError, match="cannot train with gradient checkpointing"):
        model(x, use_cache=False)


def test_a_static_cache_is_refused():
    from transformers import StaticCache

    model, x = make("llama")
    deltatune.attach(model, deltatune.config("prefix_tuning", num_virtual_tokens=2))
    with pytest.raises(DeltatuneError, match="need a DynamicCache"):
        model(x, cache=StaticCache(config=model.config, max_cache_len=16))


@pytest.mark.parametrize("fields,message", [
    ({"encoder_hidden_size": 0}, "encoder_hidden_size must be > 0"),
    ({"init": "ones"}, "prefix_tuning.init must be"),
    ({"num_virtual_tokens": -1}, "num_virtual_tokens must be > 0"),
])
def test_bad_config_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("prefix_tuning", **fields)
