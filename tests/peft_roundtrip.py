"""PEFT as the oracle, both ways: an adapter saved by PEFT loads into deltatune with PEFT's logits, and an adapter
saved by deltatune loads into PEFT with deltatune's. The one version every method's parity tests use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.core.api import shared_of
from toys import make, perturb, run

peft = pytest.importorskip("peft")


def randomise(peft_model, seed: int = 0, scale: float = 0.2, only: str | None = None) -> None:
    """Add N(0, scale²) noise to every trainable parameter of a PEFT model (with `only`: to every parameter whose
    name contains it, trainable or not — e.g. every adapter of a multi-adapter model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if (only in name) if only is not None else p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def from_peft_kwargs(method: str, peft_kwargs: dict, renames: dict | None = None):
    """Our config for the kwargs of a PEFT config: fields renamed by `renames` (target_modules -> targets always)."""
    names = {"target_modules": "targets", **(renames or {})}
    return deltatune.config(method, **{names.get(k, k): v for k, v in peft_kwargs.items()})


def peft_saved_loads_in_deltatune(peft_config, toy: str, tmp_path: Path, *, seed: int = 0, scale: float = 0.2,
                                  merged: bool = False, merge_ours: bool = False):
    """A PEFT adapter with random non-zero weights gives PEFT's logits once loaded into deltatune; returns our model.

    merged: compare with PEFT's merged model (for layers whose unmerged PEFT forward is not its own merged form);
    merge_ours: compare again after merging our adapter."""
    model, x = make(toy)
    base = run(model, x)
    peft_model = peft.get_peft_model(model, peft_config)
    randomise(peft_model, seed, scale)
    peft_model.eval()
    expected = run(peft_model, x)  # before saving: PEFT's COFT projects its parameters here
    assert (expected - base).abs().max() > 1e-3, "the PEFT adapter must change the output"
    peft_model.save_pretrained(tmp_path / "p")
    if merged:
        expected = run(peft_model.merge_and_unload(), x)
    ours, _ = make(toy)
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)
    if merge_ours:
        deltatune.merge(ours)
        torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)
    return ours


def deltatune_saved_loads_in_peft(config, toy: str, tmp_path: Path, *, scale: float = 0.2, merged: bool = False):
    """A deltatune adapter with random non-zero weights gives the same logits once loaded into PEFT (merged=True:
    into PEFT's merged model); returns the PEFT model. Adapter-wide tensors that the file holds are randomised too,
    so PEFT must read them from the file rather than draw them again from a seed."""
    model, x = make(toy)
    base = run(model, x)
    deltatune.attach(model, config)
    perturb(model, "default", seed=0, scale=scale)
    shared = shared_of(model, "default")
    if shared is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in deltatune.get_method(config.method).delta.shared_state_tensors(shared).values():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.2)
    expected = run(model, x)
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the output"
    deltatune.save(model, tmp_path / "d")
    fresh, _ = make(toy)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "d").eval()
    torch.testing.assert_close(run(peft_model.merge_and_unload() if merged else peft_model, x), expected,
                               atol=1e-5, rtol=1e-5)
    return peft_model
