"""LoRA extraction from a fully fine-tuned checkpoint (PHLoRA / mergekit extract-lora style).

For every Linear / transformers Conv1D / Embedding weight present in both checkpoints, τ = W_ft − W_base is
factorised by truncated SVD (rank, or the smallest rank keeping an `energy` fraction of Σσ²), √σ split onto A and
B, and written as a plain PEFT LoRA (per-module ranks through `rank_pattern`). Tensors are read one at a time from
the two checkpoints (never whole models); the module structure comes from the base config built on the meta
device, so no base weights are loaded. Changes a LoRA cannot hold (norm weights, biases) are reported, not
dropped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import deltatune

from ..core.errors import DeltatuneError
from ..core.hosts import host_info, host_kind, to_matrix
from .adapters import attach_lora
from .checkpoint import Checkpoint
from .full import model_dir
from .lowrank import truncate_dense

_EXTRACTABLE = ("linear", "conv1d_hf", "embedding")


def meta_model(directory: Path) -> nn.Module:
    """The model class of a transformers directory, built on the meta device (structure only, no weights)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.config._name_or_path = str(directory)
    return model


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, *, out: str | os.PathLike,
                 rank: int | None = None, energy: float | None = None, min_change: float = 0.0) -> dict:
    """Write a LoRA approximating `finetuned − base` at `out`; returns a report with the reconstruction error.

    min_change: skip modules whose relative change ‖τ‖/‖W_base‖ is at most this (0: skip only unchanged ones)."""
    if rank is None and energy is None:
        raise DeltatuneError("extraction needs a target rank or an energy threshold (e.g. rank=32 or energy=0.9)")
    base_dir, ft_dir = model_dir(str(base)), model_dir(str(finetuned))
    base_ckpt, ft_ckpt = Checkpoint(base_dir), Checkpoint(ft_dir)
    model = meta_model(base_dir)
    factors, modules, dropped, total = {}, [], 0.0, 0.0
    handled = set()
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if host_kind(module) not in _EXTRACTABLE or key not in base_ckpt or key in handled:
            continue
        handled.add(key)
        if key not in ft_ckpt:
            raise DeltatuneError(f"{ft_dir}: tensor {key!r} is missing; is it a fine-tune of {base_dir}?")
        w_base, w_ft = base_ckpt.read(key).float(), ft_ckpt.read(key).float()
        if w_base.shape != w_ft.shape:
            raise DeltatuneError(f"{key}: shape {tuple(w_ft.shape)} in the fine-tune but {tuple(w_base.shape)} in the "
                                 "base; the checkpoints are of different models")
        tau = w_ft - w_base
        change = float(tau.norm() / w_base.norm().clamp(min=1e-12))
        if change <= min_change:
            continue
        low = truncate_dense(to_matrix(host_info(module, path), tau), rank, energy)
        factors[path] = (low.a, low.b)
        modules.append({"path": path, "rank": low.rank, "relative_error": round(low.relative_error, 6)})
        dropped, total = dropped + low.dropped_energy, total + low.total_energy
    if not factors:
        raise DeltatuneError(f"{ft_dir} does not differ from {base_dir} in any Linear / Embedding weight; nothing to "
                             "extract")
    _save_on_meta(model, factors, out)
    return {"adapter": str(out), "modules": len(modules), "rank_max": max(m["rank"] for m in modules),
            "relative_error": round((dropped / total) ** 0.5 if total else 0.0, 6),
            "not_captured": _not_captured(base_ckpt, ft_ckpt, handled), "per_module": modules}


def _save_on_meta(model: nn.Module, factors: dict, out) -> None:
    """Attach the LoRA to the meta model with real storage for its own tensors only, and save it."""
    attach_lora(model, factors, {}, "extracted", materialise=True)
    deltatune.save(model, out, name="extracted")


def _not_captured(base: Checkpoint, ft: Checkpoint, handled: set[str]) -> list[dict]:
    """Other tensors that changed (norms, biases): a LoRA cannot carry them."""
    out = []
    for name in base.names():
        if name in handled or name not in ft:
            continue
        a, b = base.read(name), ft.read(name)
        if a.shape == b.shape and a.is_floating_point() and not torch.equal(a, b):
            change = float((b.float() - a.float()).norm() / a.float().norm().clamp(min=1e-12))
            out.append({"tensor": name, "relative_change": round(change, 6)})
    return out
