"""Adapters as weight updates: read any mergeable adapter's ΔW per module, and write updates back as an adapter.

Reading uses only the contract (`Delta.delta_weight(host)` / `delta_bias(host)`), so every method that can merge
can be combined, converted and exported. A plain LoRA is also read in factor space (A, s·B): its saved tensors
come from `state_tensors` (PEFT's names), and a probe (ΔW·v against s·B·(A·v)) confirms the factors before they
are trusted, so a method that reuses LoRA's names with other math falls back to weight space instead of being
misread.

Writing builds a new adapter on the same model at exact module paths: a plain LoRA (per-module ranks through
`rank_pattern`, alpha = rank so the scale is 1) or the `full` dense-delta method, filled through the contract's
`load_state_tensors` and saved with `deltatune.save` (PEFT layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import deltatune

from ..core.errors import DeltatuneError
from ..core.hosts import from_matrix, to_matrix
from ..core.slot import Host, slots_of

_FACTOR_METHODS = ("lora", "rslora")
_A_KEYS = ("lora_A.weight", "lora_embedding_A")
_B_KEYS = ("lora_B.weight", "lora_embedding_B")


@dataclass
class ModuleUpdate:
    """One adapter's update on one module, in the matrix view (out, fan_in).

    Attributes:
        weight: ΔW as a matrix (None when only factors are kept).
        bias: Δb or None.
        factors: (A, B) with ΔW = B·A when the adapter is a plain LoRA, else None.
    """

    weight: Tensor | None
    bias: Tensor | None
    factors: tuple[Tensor, Tensor] | None = None

    def dense(self) -> Tensor:
        return self.weight if self.weight is not None else self.factors[1] @ self.factors[0]


def hosts_of(model: nn.Module) -> dict[str, tuple[nn.Module, object]]:
    """module path -> (module, slot) for every adapted module."""
    return {path: (module, slot) for path, module, slot in slots_of(model)}


def read_updates(model: nn.Module, name: str, *, factors: bool = True) -> dict[str, ModuleUpdate]:
    """Adapter `name`'s update on every module it sits on (factor space for plain LoRA when `factors`)."""
    spec = deltatune.get_method(deltatune.adapters(model)[name].method)
    if not spec.mergeable:
        raise DeltatuneError(f"adapter {name!r} ({spec.name}) acts on activations and has no weight update; it "
                             "cannot be combined, converted or exported")
    out = {}
    with torch.no_grad():
        for path, (module, slot) in hosts_of(model).items():
            if name not in slot:
                continue
            delta, host = slot[name], Host(module, slot)
            pair = _lora_factors(delta, host) if factors and spec.name in _FACTOR_METHODS else None
            bias = delta.delta_bias(host)
            bias = None if bias is None else bias.detach().float().clone()
            if pair is not None:
                out[path] = ModuleUpdate(None, bias, pair)
            else:
                out[path] = ModuleUpdate(to_matrix(slot.info, delta.delta_weight(host).detach()).float().clone(), bias)
    return out


def _lora_factors(delta, host: Host) -> tuple[Tensor, Tensor] | None:
    tensors = delta.state_tensors(host)
    a = next((tensors[k] for k in _A_KEYS if k in tensors), None)
    b = next((tensors[k] for k in _B_KEYS if k in tensors), None)
    if a is None or b is None:
        return None
    r = a.shape[0]
    scale = delta.config.scaling_for(delta.path)
    a = a.reshape(r, -1).float().clone()
    b = (b.reshape(-1, r).float() * scale).clone()
    dense = to_matrix(delta.info, delta.delta_weight(host).detach()).float()
    probe = torch.randn(a.shape[1], 2, generator=torch.Generator().manual_seed(0))
    if dense.shape != (b.shape[0], a.shape[1]) or not torch.allclose(dense @ probe, b @ (a @ probe), rtol=1e-4,
                                                                       atol=1e-6):
        return None
    return a, b


# ---- writing -----------------------------------------------------------------------------------------------------
def exact_paths_regex(paths: list[str]) -> str:
    """A targets regex that matches exactly these module paths (attach full-matches a string target)."""
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True)) + ")"


def attach_lora(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]], biases: dict[str, Tensor],
                name: str, *, materialise: bool = False) -> None:
    """Attach adapter `name`: a plain LoRA with exactly these (A, B) per module (scale 1) and optional Δb.

    materialise: give the new deltas CPU storage first (for a model built on the meta device)."""
    ranks = {p: a.shape[0] for p, (a, _) in factors.items()}
    top = max(ranks.values())
    pattern = {re.escape(p): r for p, r in sorted(ranks.items(), key=lambda kv: -len(kv[0])) if r != top}
    cfg = deltatune.config("lora", r=top, alpha=float(top), targets=exact_paths_regex(list(factors)),
                           rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
                           lora_bias=bool(biases))
    deltatune.attach(model, cfg, name=name)
    hosts = hosts_of(model)
    for path, (a, b) in factors.items():
        module, slot = hosts[path]
        host = Host(module, slot)
        delta = slot[name]
        if materialise:
            delta.to_empty(device="cpu")
        expected = delta.state_tensors(host)
        given = {}
        for key, ref in expected.items():
            source = a if key in _A_KEYS else b if key in _B_KEYS else biases.get(path, torch.zeros(ref.shape))
            given[key] = source.reshape(ref.shape).to(device=ref.device, dtype=ref.dtype)
        delta.load_state_tensors(given, host)
        _verify(delta, host, b @ a, path)


def attach_full(model: nn.Module, weights: dict[str, Tensor], biases: dict[str, Tensor], name: str) -> None:
    """Attach adapter `name`: the `full` dense-delta method holding exactly these matrix-view updates."""
    cfg = deltatune.config("full", targets=exact_paths_regex(list(weights)), train_bias=bool(biases))
    deltatune.attach(model, cfg, name=name)
    hosts = hosts_of(model)
    for path, matrix in weights.items():
        module, slot = hosts[path]
        host = Host(module, slot)
        delta = slot[name]
        native = from_matrix(slot.info, matrix)
        given = {}
        for key, ref in delta.state_tensors(host).items():
            source = native if tuple(ref.shape) == tuple(native.shape) else biases.get(path, torch.zeros(ref.shape))
            given[key] = source.reshape(ref.shape).to(device=ref.device, dtype=ref.dtype)
        delta.load_state_tensors(given, host)
        _verify(delta, host, matrix, path)


def _verify(delta, host: Host, matrix: Tensor, path: str) -> None:
    """The written adapter must reproduce the update it was given (guards the tensor-name mapping)."""
    got = to_matrix(delta.info, delta.delta_weight(host).detach()).float()
    want = matrix.float()
    tolerance = 1e-4 * max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, atol=tolerance, rtol=1e-3):
        raise RuntimeError(f"internal error: the adapter written at {path!r} does not reproduce its update")


def save_new_adapter(model: nn.Module, name: str, out) -> None:
    """Save adapter `name` and take it off the model again (the model is left as it was)."""
    try:
        deltatune.save(model, out, name=name)
    finally:
        deltatune.delete(model, name)


def load_adapters(model: nn.Module, directories: list, prefix: str = "input") -> list[str]:
    """Load each adapter directory under a fresh name; returns the names."""
    taken = set(deltatune.adapters(model))
    names = []
    for i, directory in enumerate(directories):
        name = f"{prefix}{i}"
        while name in taken:
            name += "_"
        deltatune.load(model, directory, name=name)
        names.append(name)
        taken.add(name)
    return names
