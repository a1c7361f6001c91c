"""`inspect` and `compare`: what an update does to each layer, as plain data (dicts and lists, JSON-ready).

inspect: method, targets, parameter counts, and per layer the norms, singular-value spectrum, effective / stable /
numerical rank of ΔW and the intruder dimensions of W₀ + ΔW relative to W₀. compare: per layer the cosine
similarity of the two ΔW, the overlap of their top singular subspaces, and the layers that differ most. Either
side of a comparison can be an adapter directory or a fully fine-tuned model directory (ΔW = W_ft − W₀).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.errors import DeltatuneError
from . import spectra
from .deltas import (
    DeltaSet,
    LayerDelta,
    adapter_summary,
    base_model_name,
    is_adapter_dir,
    load_base_model,
    open_deltas,
)

MOST_DIFFERENT = 5


def _base(base: str | nn.Module | None, source: str | Path) -> tuple[nn.Module, str]:
    if isinstance(base, nn.Module):
        return base, type(base).__name__
    name = base_model_name(base, source)
    return load_base_model(name), name


def layer_report(layer: LayerDelta, *, intruder_k: int, epsilon: float, keep: int, intruders: bool) -> dict:
    """Norms, spectrum, ranks and intruder dimensions of one module's update."""
    row = {"path": layer.path, "kind": layer.kind, "shape": list(layer.delta.shape)}
    row.update(spectra.spectrum_summary(layer.delta, keep=keep))
    base_norm = float(layer.base.norm())
    row["base_fro_norm"] = base_norm
    row["relative_norm"] = row["fro_norm"] / base_norm if base_norm else None
    row["bias_norm"] = None if layer.bias is None else float(layer.bias.norm())
    if intruders and layer.kind != "norm":
        row["intruders"] = spectra.intruder_dimensions(layer.base, layer.base + layer.delta, intruder_k, epsilon)
    return row


def inspect_deltas(deltas: DeltaSet, *, intruder_k: int = spectra.DEFAULT_INTRUDER_K,
                   epsilon: float = spectra.DEFAULT_INTRUDER_EPSILON, keep: int = 64,
                   intruders: bool = True) -> dict:
    """The per-layer part of `inspect` for any DeltaSet, and a summary over layers."""
    layers = [layer_report(deltas.get(p), intruder_k=intruder_k, epsilon=epsilon, keep=keep, intruders=intruders)
              for p in deltas.paths]
    return {"layers": layers, "summary": summarise(layers)}


def summarise(layers: list[dict]) -> dict:
    if not layers:
        return {"layers": 0}
    counts = [row["intruders"]["count"] for row in layers if "intruders" in row]
    largest = max(layers, key=lambda row: row["fro_norm"])
    return {
        "layers": len(layers),
        "total_fro_norm": sum(row["fro_norm"] ** 2 for row in layers) ** 0.5,
        "mean_effective_rank": sum(row["effective_rank"] for row in layers) / len(layers),
        "max_numerical_rank": max(row["numerical_rank"] for row in layers),
        "largest_update": largest["path"],
        "total_intruders": sum(counts) if counts else None,
        "layers_with_intruders": sum(c > 0 for c in counts) if counts else None,
    }


def inspect(source: str | Path, base: str | nn.Module | None = None, *,
            intruder_k: int = spectra.DEFAULT_INTRUDER_K, epsilon: float = spectra.DEFAULT_INTRUDER_EPSILON,
            keep: int = 64, intruders: bool = True, calibration: dict | None = None) -> dict:
    """Everything `deltatune inspect` reports about an adapter (or a fine-tuned model directory).

    Args:
        source: adapter directory, or a fine-tuned model directory (then ΔW = W_ft − W_base).
        base: base model name / directory or an nn.Module (default: the adapter's base_model_name_or_path).
        intruder_k, epsilon: top singular vectors examined and the cosine threshold (Algorithm 1 of the paper).
        keep: singular values kept per layer in the result.
        intruders: compute intruder dimensions (two full SVDs per layer; off for a quick look).
        calibration: a fitted DSiRe model (`dsire.fit`); adds a dataset-size estimate.
    """
    if intruder_k <= 0 or not 0.0 < epsilon <= 1.0:
        raise DeltatuneError(f"intruder_k must be > 0 and epsilon in (0, 1], got {intruder_k} and {epsilon}")
    result = adapter_summary(source) if is_adapter_dir(source) else {"adapter": str(source), "method": "full"}
    if is_adapter_dir(source) and not result["mergeable"]:
        result.update(layers=[], summary={"layers": 0}, note=f"{result['method']} acts on activations: it has no "
                      "ΔW, so there are no spectra or intruder dimensions to report")
        return result
    model, base_name = _base(base, source)
    result["analysed_against"] = base_name
    with open_deltas(model, source) as deltas:
        result.update(inspect_deltas(deltas, intruder_k=intruder_k, epsilon=epsilon, keep=keep,
                                     intruders=intruders))
        if calibration is not None:
            from .dsire import features_of, predict

            result["dataset_size"] = predict(calibration, features_of(deltas, calibration["values"]))
    per_module = (result.get("parameters") or {}).get("per_module", {})
    for row in result["layers"]:
        row["parameters"] = per_module.get(row["path"])
    if "parameters" not in result:
        result["targets"] = [row["path"] for row in result["layers"]]
    return result


def compare_sets(a: DeltaSet, b: DeltaSet, *, top_k: int = 8) -> dict:
    """Per-layer comparison of two DeltaSets on the same base model."""
    common = sorted(set(a.paths) & set(b.paths))
    layers = []
    for path in common:
        left, right = a.get(path), b.get(path)
        u_a, v_a = spectra.top_singular_vectors(left.delta, top_k)
        u_b, v_b = spectra.top_singular_vectors(right.delta, top_k)
        layers.append({
            "path": path,
            "cosine": spectra.cosine(left.delta, right.delta),
            "relative_difference": spectra.relative_difference(left.delta, right.delta),
            "overlap_output": spectra.subspace_overlap(u_a, u_b),
            "overlap_input": spectra.subspace_overlap(v_a, v_b),
            "norm_a": float(left.delta.norm()),
            "norm_b": float(right.delta.norm()),
        })
    ranked = sorted(layers, key=lambda row: (row["cosine"], -row["relative_difference"]))
    return {
        "a": a.label, "b": b.label, "top_k": top_k,
        "layers": layers,
        "only_a": sorted(set(a.paths) - set(b.paths)),
        "only_b": sorted(set(b.paths) - set(a.paths)),
        "mean_cosine": sum(r["cosine"] for r in layers) / len(layers) if layers else None,
        "most_different": [r["path"] for r in ranked[:MOST_DIFFERENT]],
    }


def compare(a: str | Path, b: str | Path, base: str | nn.Module | None = None, *, top_k: int = 8) -> dict:
    """Everything `deltatune compare` reports: A and B are adapter or fine-tuned model directories."""
    if top_k <= 0:
        raise DeltatuneError(f"top_k must be > 0, got {top_k}")
    if base is None and not (is_adapter_dir(a) or is_adapter_dir(b)):
        raise DeltatuneError("comparing two fine-tuned models needs --base (the model both started from)")
    model, base_name = _base(base, a if is_adapter_dir(a) else b)
    with open_deltas(model, a) as left, open_deltas(model, b) as right:
        result = compare_sets(left, right, top_k=top_k)
    if not result["layers"]:
        raise DeltatuneError(f"{a} and {b} adapt no module in common; nothing to compare")
    result["analysed_against"] = base_name
    return result
