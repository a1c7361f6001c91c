"""DePT: a short soft prompt plus a position-wise low-rank update A·B of the input token embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from toys import make, perturb, run

import deltatune
import deltatune.methods.dept
from deltatune import DeltatuneError
from deltatune.methods.prompt_body import BodyDims


def _encoder(model, name="default"):
    return model.base_model.deltatune[name].prompt_encoder


@pytest.mark.parametrize("max_length", [16, 2])  # 2: positions 2.. of the 6-token input get no update
def test_output_is_the_base_model_on_prompt_then_updated_embeddings(max_length):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("dept", num_virtual_tokens=3, r=2, alpha=4.0, max_length=max_length))
    perturb(model, "default", seed=0)
    enc = _encoder(model)
    update = torch.zeros(x.shape[1], 16)
    covered = min(max_length, x.shape[1])
    update[:covered] = (4.0 / math.sqrt(2)) * (enc.lora_embedding_A @ enc.lora_embedding_B)[:covered].detach()
    real = model.get_input_embeddings()(x) + update
    embeds = torch.cat([enc.embedding.weight.detach().expand(3, -1, -1), real], dim=1)
    with deltatune.use(model, None), torch.no_grad():
        expected = model(inputs_embeds=embeds).logits[:, 3:]
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=0)


def test_at_init_only_the_short_prompt_acts():
    model, x = make("gpt2")
    deltatune.attach(model, deltatune.config("dept", num_virtual_tokens=3, r=2, max_length=8), name="d")
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=3), name="p")
    assert _encoder(model, "d").lora_embedding_B.abs().max() == 0 and _encoder(model, "d").lora_embedding_A.std() > 0
    with torch.no_grad():
        _encoder(model, "p").embedding.weight.copy_(_encoder(model, "d").embedding.weight)
    with deltatune.use(model, "d"):
        dept = run(model, x)
    with deltatune.use(model, "p"):
        torch.testing.assert_close(run(model, x), dept, atol=0, rtol=0)


def test_the_prompt_and_the_low_rank_pair_get_two_learning_rates():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("dept", num_virtual_tokens=3, r=2, max_length=8))
    groups = deltatune.optim.param_groups(model, lr=1e-4, lora_plus_ratio=1000.0)
    fast = next(g for g in groups if g["lr"] == pytest.approx(0.1))
    assert fast["params"] == [_encoder(model).embedding.weight]


def test_default_budget_matches_100_token_prompt_tuning_at_width_768():
    dims = BodyDims(768)
    assert deltatune.config("dept").count(dims) == deltatune.config("prompt_tuning", num_virtual_tokens=100).count(dims)


@pytest.mark.parametrize("fields,message", [
    ({"r": 0}, "r and max_length must be > 0"),
    ({"max_length": 0}, "r and max_length must be > 0"),
    ({"init": "text"}, "init_text is needed"),
])
def test_bad_config_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("dept", **fields)
