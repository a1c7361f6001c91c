"""LoRA Dropout: training drops whole columns of A and rows of B; eval is the plain LoRA (the expected update); the
test-time ensemble averages sampled passes and converges on it; bad input is refused."""

from __future__ import annotations

import pytest
import torch
from toys import make, perturb, run

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of
from deltatune.methods.lora_dropout import ensemble


def _model(p: float = 0.5, seed: int = 0, target: str = "lin1"):
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("lora_dropout", r=4, alpha=4.0, param_dropout=p, targets=[target]))
    perturb(model, "default", seed=seed)
    return model, x, next(s["default"] for _, _, s in slots_of(model))


def test_training_drops_whole_columns_of_a_and_rows_of_b():
    model, x, delta = _model(p=0.5)
    torch.manual_seed(0)
    model.train()
    model(x).pow(2).sum().backward()
    dead_columns = (delta.lora_A.grad == 0).all(dim=0)
    dead_rows = (delta.lora_B.grad == 0).all(dim=1)
    assert dead_columns.any() and not dead_columns.all()  # p = 0.5 over 10+ columns: some drop, some stay
    assert dead_rows.any() and not dead_rows.all()
    assert (delta.lora_A.grad[:, ~dead_columns] != 0).all()  # a kept column trains in every row of A


def test_eval_is_the_plain_lora_and_deterministic():
    model, x, delta = _model()
    model.eval()
    first = run(model, x)
    torch.testing.assert_close(run(model, x), first, atol=0, rtol=0)
    plain, _ = make("mlp")
    deltatune.attach(plain, deltatune.config("lora", r=4, alpha=4.0, targets=["lin1"]))
    twin = next(s["default"] for _, _, s in slots_of(plain))
    with torch.no_grad():
        twin.lora_A.copy_(delta.lora_A)
        twin.lora_B.copy_(delta.lora_B)
    torch.testing.assert_close(first, run(plain, x), atol=1e-6, rtol=1e-6)


def test_ensemble_samples_masks_and_converges_on_the_expected_output():
    model, x, _ = _model(p=0.3, target="lin0")
    model.eval()
    layer = model.lin0  # the adapted layer's own output is linear in each mask, so its mean is the plain LoRA's
    expected = run(layer, x)
    torch.manual_seed(1)
    one = ensemble(model, lambda: layer(x), n=1)
    many = ensemble(model, lambda: layer(x), n=400)
    error_one, error_many = (one - expected).norm(), (many - expected).norm()
    assert error_one > 0  # the masks are drawn in eval mode inside the ensemble
    assert error_many < error_one / 5  # independent unbiased masks: the mean tends to the plain output
    torch.testing.assert_close(run(layer, x), expected, atol=0, rtol=0)  # sampling is off again afterwards


def test_bad_input_is_refused():
    with pytest.raises(DeltatuneError, match="param_dropout"):
        deltatune.config("lora_dropout", param_dropout=1.5)
    with pytest.raises(DeltatuneError, match="init must be"):
        deltatune.config("lora_dropout", init="pissa")
    model, x, _ = _model()
    with pytest.raises(DeltatuneError, match="n must be >= 1"):
        ensemble(model, lambda: model(x), n=0)
    plain, _ = make("mlp")
    deltatune.attach(plain, deltatune.config("lora", r=2, targets=["lin1"]))
    with pytest.raises(DeltatuneError, match="no lora_dropout adapter"):
        ensemble(plain, lambda: plain(x))
