"""Weighted arithmetic on adapters of any mergeable method, and conversion of any adapter to a plain LoRA.

    deltatune.merging.combine(model, ["math", "code"], weights=[1.0, 0.5], out="combined")        # Σ wᵢ·ΔWᵢ
    deltatune.merging.combine(model, ["base_skill", "unwanted"], weights=[1.0, -1.0], out="unlearned")
    deltatune.merging.combine(model, names, method="ties", params={"density": 0.3}, rank=16, out="ties16")
    deltatune.merging.convert(model, "dora_adapter", rank=16, out="as_lora")                     # for vLLM

- Linear and task arithmetic on plain LoRAs stay in factor space: Σ wᵢBᵢAᵢ = [w₁B₁ … wₙBₙ]·[A₁; …; Aₙ] exactly
  (rank Σ rᵢ), or re-factorised to a chosen rank / energy through QR + a small SVD, never forming ΔW.
- Everything else works in weight space: each adapter's ΔW per module (zero where it is absent) goes through any
  registered merge method with a zero base (TIES, DARE, … on adapters), and the result is written as a plain LoRA
  of the chosen rank / energy (truncated SVD, error reported) or, exactly, as the `full` dense-delta method.
- Bias updates combine linearly with the same weights.
The result is saved as a normal adapter (PEFT layout); the model is left as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import deltatune

from ..core.errors import DeltatuneError
from .adapters import ModuleUpdate, attach_full, attach_lora, load_adapters, read_updates, save_new_adapter
from .full import layer_of
from .lowrank import LowRank, concatenate, truncate_dense, truncate_factored
from .registry import MergeMethodSpec, TensorInfo, get_merge_method

Output = Literal["auto", "lora", "full"]
_FACTOR_SPACE_METHODS = ("linear", "task_arithmetic")


@dataclass
class ModuleResult:
    path: str
    rank: int | None  # None for a dense (full) result
    relative_error: float  # ‖ΔW − written‖_F / ‖ΔW‖_F for this module


@dataclass
class CombineResult:
    """What was written: the adapter directory, its kind, the space the arithmetic ran in, and the error."""

    directory: Path
    kind: str  # "lora" | "full"
    space: str  # "factor" | "weight"
    modules: list[ModuleResult] = field(default_factory=list)
    relative_error: float = 0.0  # over all modules: sqrt(Σ dropped energy / Σ energy)

    def summary(self) -> dict[str, Any]:
        ranks = [m.rank for m in self.modules if m.rank is not None]
        worst = max(self.modules, key=lambda m: m.relative_error, default=None)
        return {"adapter": str(self.directory), "kind": self.kind, "space": self.space, "modules": len(self.modules),
                "rank_min": min(ranks, default=None), "rank_max": max(ranks, default=None),
                "relative_error": round(self.relative_error, 6),
                "worst_module": None if worst is None else {"path": worst.path,
                                                            "relative_error": round(worst.relative_error, 6)}}


def combine(model: nn.Module, adapters: list[str | os.PathLike], *, out: str | os.PathLike,
            method: str = "task_arithmetic", weights: list[float] | None = None, params: dict | None = None,
            output: Output = "auto", rank: int | None = None, energy: float | None = None) -> CombineResult:
    """Combine attached adapters (by name) or adapter directories into one new adapter saved at `out`.

    output: "lora" (needs rank or energy unless the arithmetic is exact in factor space), "full" (exact dense
    delta), or "auto" (LoRA when every input is a LoRA and the method is linear / task arithmetic or a rank or
    energy is given, else full)."""
    names, loaded = _names(model, adapters)
    try:
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise DeltatuneError(f"got {len(weights)} weights for {len(names)} adapters; give one per adapter")
        spec = get_merge_method(method)
        spec.check_inputs(len(names), True, f"combining adapters with {method!r}")
        updates = [read_updates(model, n) for n in names]
        paths = list(dict.fromkeys(p for u in updates for p in u))
        all_lora = all(u.factors is not None for ups in updates for u in ups.values())
        if spec.on_factors:
            return _combine_factors(model, spec, names, updates, paths, weights, params or {}, (rank, energy), out)
        factored = method in _FACTOR_SPACE_METHODS and output != "full" and all_lora
        kind = "full" if output == "full" or (output == "auto" and not factored and rank is None and energy is None) \
            else "lora"
        if kind == "lora" and not factored and rank is None and energy is None:
            raise DeltatuneError(f"writing a LoRA from a weight-space {method!r} result needs rank=... or energy=...; "
                                 "or write output='full' (exact)")
        coefficients = _linear_coefficients(spec, weights, params or {}) if factored else None
        result = CombineResult(Path(out), kind, "factor" if factored else "weight")
        biases = _combined_biases(updates, paths, _linear_coefficients(spec, weights, params or {}, lenient=True))
        if factored:
            lowranks = {p: _factored(updates, p, coefficients, rank, energy) for p in paths}
        else:
            dense = {p: _weight_space(spec, updates, p, weights, params or {}, len(paths)) for p in paths}
            lowranks = {p: truncate_dense(m, rank, energy) for p, m in dense.items()} if kind == "lora" else None
        _write(model, result, lowranks if kind == "lora" else dense, biases)
        return result
    finally:
        for n in loaded:
            deltatune.delete(model, n)


def convert(model: nn.Module, adapter: str | os.PathLike, *, out: str | os.PathLike, rank: int | None = None,
            energy: float | None = None) -> CombineResult:
    """Any mergeable adapter as a plain LoRA of `rank` (or the smallest rank keeping an `energy` fraction of each
    module's squared singular values); the reconstruction error is in the result."""
    if rank is None and energy is None:
        raise DeltatuneError("convert needs a target rank or an energy threshold (e.g. rank=16 or energy=0.95)")
    return combine(model, [adapter], out=out, method="task_arithmetic", output="lora", rank=rank, energy=energy)


def _names(model: nn.Module, adapters: list) -> tuple[list[str], list[str]]:
    """Attached names as given; directories are loaded under fresh names (returned second, to delete later)."""
    if not adapters:
        raise DeltatuneError("no adapters to combine; give at least one adapter name or directory")
    attached = set(deltatune.adapters(model))
    dirs = [a for a in adapters if not (isinstance(a, str) and a in attached)]
    loaded = load_adapters(model, dirs) if dirs else []
    it = iter(loaded)
    return [a if isinstance(a, str) and a in attached else next(it) for a in adapters], loaded


def _linear_coefficients(spec: MergeMethodSpec, weights: list[float], params: dict, lenient: bool = False) -> list[float]:
    """The per-adapter coefficients of linear / task arithmetic (linear normalises by Σw by default)."""
    if spec.name == "linear":
        kwargs = spec.resolve({"weight": weights, **params}, len(weights))
        total = sum(weights)
        if kwargs["normalize"] and abs(total) < 1e-12:
            raise DeltatuneError("linear merge with weights summing to 0; set normalize: false or change the weights")
        return [w / total for w in weights] if kwargs["normalize"] else list(weights)
    lam = params.get("lambda", 1.0) if (lenient or spec.name == "task_arithmetic") else 1.0
    return [w * lam for w in weights]


def _factored(updates: list[dict[str, ModuleUpdate]], path: str, coefficients: list[float], rank: int | None,
              energy: float | None) -> LowRank | tuple[Tensor, Tensor]:
    pairs = [(u[path].factors, c) for u, c in zip(updates, coefficients) if path in u]
    a, b = concatenate([f for f, _ in pairs], [c for _, c in pairs])
    if rank is None and energy is None:
        return a, b
    return truncate_factored(a, b, rank, energy)


def _weight_space(spec: MergeMethodSpec, updates: list[dict[str, ModuleUpdate]], path: str, weights: list[float],
                  params: dict, num_modules: int) -> Tensor:
    present = next(u[path] for u in updates if path in u)
    shape = (present.factors[1].shape[0], present.factors[0].shape[1]) if present.weight is None \
        else present.weight.shape
    tensors = [u[path].dense() if path in u else torch.zeros(shape) for u in updates]
    given = dict(params)
    if "weight" in spec.settings:
        given["weight"] = weights
    kwargs = spec.resolve(given, len(tensors), f"combining adapters with {spec.name!r}")
    lay = layer_of(path + ".")
    info = TensorInfo(path, lay[1] if lay else None, _layer_count(updates))
    base = torch.zeros(shape) if spec.base != "unused" else None
    with torch.no_grad():
        merged = spec.call_resolved(tensors, base, info, kwargs)
    if not torch.isfinite(merged).all():
        raise DeltatuneError(f"merge method {spec.name!r} gave NaN/Inf at {path!r}; nothing was written")
    return merged


def _combine_factors(model: nn.Module, spec: MergeMethodSpec, names: list[str], updates: list, paths: list[str],
                     weights: list[float], params: dict, target: tuple, out) -> CombineResult:
    """A method on LoRA factors (federated aggregation, LoRA-LEGO, EigenLoRAx): every input must be a plain LoRA;
    each module merges the adapters present there, with their weights."""
    for name, ups in zip(names, updates):
        if any(u.factors is None for u in ups.values()):
            raise DeltatuneError(f"{spec.name!r} merges LoRA factors, but adapter {name!r} is not a plain LoRA; "
                                 "convert it first (deltatune convert --rank R)")
    lowranks = {}
    for path in paths:
        present = [(u[path].factors, w) for u, w in zip(updates, weights) if path in u]
        given = {**params, **({"weight": [w for _, w in present]} if "weight" in spec.settings else {})}
        kwargs = spec.resolve(given, len(present), f"combining adapters with {spec.name!r}")
        with torch.no_grad():
            a, b = spec.fn([f for f, _ in present], **kwargs)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DeltatuneError(f"merge method {spec.name!r} gave NaN/Inf at {path!r}; nothing was written")
        lowranks[path] = truncate_factored(a, b, *target) if any(v is not None for v in target) else (a, b)
    result = CombineResult(Path(out), "lora", "factor")
    biases = _combined_biases(updates, paths, weights)
    _write(model, result, lowranks, biases)
    return result


def _layer_count(updates: list[dict[str, ModuleUpdate]]) -> int:
    layers = [lay[1] for u in updates for p in u if (lay := layer_of(p + "."))]
    return max(layers, default=0) + 1


def _combined_biases(updates: list[dict[str, ModuleUpdate]], paths: list[str], coefficients: list[float]) -> dict:
    biases = {}
    for path in paths:
        parts = [(u[path].bias, c) for u, c in zip(updates, coefficients) if path in u and u[path].bias is not None]
        if parts:
            biases[path] = sum(c * b for b, c in parts)
    return biases


def _write(model: nn.Module, result: CombineResult, per_module: dict, biases: dict[str, Tensor]) -> None:
    name = "combined"
    while name in deltatune.adapters(model):
        name += "_"
    dropped = total = 0.0
    if result.kind == "full":
        attach_full(model, per_module, biases, name)
        result.modules = [ModuleResult(p, None, 0.0) for p in per_module]
    else:
        factors = {}
        for path, item in per_module.items():
            if isinstance(item, LowRank):
                factors[path] = (item.a, item.b)
                result.modules.append(ModuleResult(path, item.rank, item.relative_error))
                dropped, total = dropped + item.dropped_energy, total + item.total_energy
            else:
                factors[path] = item
                result.modules.append(ModuleResult(path, item[0].shape[0], 0.0))
        attach_lora(model, factors, biases, name)
    result.relative_error = (dropped / total) ** 0.5 if total > 0 else 0.0
    save_new_adapter(model, name, result.directory)
