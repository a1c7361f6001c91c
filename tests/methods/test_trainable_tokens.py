"""Trainable tokens: only the selected rows of the embedding output change; PEFT parity both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.methods.trainable_tokens  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host

from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from toys import make, perturb

SELECTED = [0, 3, 5, 8, 13, 21, 29]


def test_only_selected_rows_of_the_embedding_output_change():
    model, _ = make("emb")
    deltatune.attach(model, deltatune.config("trainable_tokens", targets=["emb"], token_indices=SELECTED))
    perturb(model, "default", seed=0)
    ids = torch.arange(30).view(3, 10)
    adapted = model.emb(ids)
    with deltatune.use(model, None):
        base = model.emb(ids)
    changed = (adapted - base).abs().amax(-1).flatten() > 0
    assert changed.nonzero().flatten().tolist() == SELECTED
    emb = model.emb
    delta_w = emb.deltatune["default"].delta_weight(Host(emb, emb.deltatune))
    assert delta_w.abs().amax(-1).nonzero().flatten().tolist() == SELECTED


def test_parameter_count_is_tokens_times_dim():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("trainable_tokens", targets=["embed_tokens"], token_indices=[1, 2, 3]))
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == 3 * 16


@pytest.mark.parametrize("indices,message", [
    ([-1, 2], "token_indices must be >= 0"),
    ([2, 2], "token_indices has repeated ids"),
    ([], "token_indices is empty"),
    ([30], "token id 30 is outside the vocabulary of 'emb'"),
])
def test_bad_token_indices(indices, message):
    model, _ = make("emb")
    with pytest.raises(DeltatuneError, match=message):
        deltatune.attach(model, deltatune.config("trainable_tokens", targets=["emb"], token_indices=indices))


def test_peft_saved_loads_in_deltatune(tmp_path):
    cfg = peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=list(range(0, 64, 3)),
                                     init_weights=False)
    peft_saved_loads_in_deltatune(cfg, "llama", tmp_path, merge_ours=True)


def test_deltatune_saved_loads_in_peft(tmp_path):
    config = deltatune.config("trainable_tokens", targets=["embed_tokens"], token_indices=list(range(1, 64, 2)))
    deltatune_saved_loads_in_peft(config, "llama", tmp_path)
