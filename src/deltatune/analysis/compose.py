"""Weighted composition of several adapters: live (per input or per token) and as a stored artefact.

Live: `weighted(model, names, weights)` applies attached adapters together, adapter i scaled by a weight that is
either a constant or a function of the module's input (Arrow's per-token routing). It needs no core change: while
it is active the model's routing is set to "no adapter", and a forward hook placed after deltatune's own on each
adapted module adds Σᵢ wᵢ·(deltaᵢ(x, y) − y). Because it calls each delta's own `forward`, it works for every method,
activation-space ones included. (A per-adapter output scale in the core's routing state would make this a
one-line change in `DeltaSlot.hook` and avoid one copy of y per adapter; see the analysis notes.)

Artefact: `compose_lora(model, names, weights)` writes Σᵢ wᵢ·ΔWᵢ as an exact LoRA (rank = the numerical rank of the
sum, SVD-factored), so a composition can be stored, exported and loaded by PEFT like any adapter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import api
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS
from ..core.io import save
from ..core.registry import config as method_config
from ..core.slot import Host, first_input, slots_of  # the core's own reading of a hook's input
from .deltas import loaded_delta_set
from .spectra import numerical_rank, svd

Weigher = Callable[[str, Tensor], Tensor]  # (module path, module input) -> weights (..., n) or (n,)


def _mix_hook(slot, path: str, names: Sequence[str], present: list[int], weigher: Weigher,
              module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
    if slot.bypass:  # a norm host re-entering its own forward through Host.apply
        return None
    x = first_input(args, kwargs)
    weights = weigher(path, x)
    host = Host(module, slot, output)
    mixed = output
    for i in present:
        contribution = slot[names[i]](x, output.clone(), host) - output
        w = weights[..., i]
        if w.ndim:  # per-token weights: (batch, tokens) against (batch, tokens, features)
            w = w.unsqueeze(-1) if slot.info.kind not in CONV_KINDS else w.reshape(-1, *[1] * (output.ndim - 1))
        mixed = mixed + w.to(output.dtype) * contribution
    return mixed


def constant_weigher(weights: Sequence[float]) -> Weigher:
    fixed = torch.tensor([float(w) for w in weights])
    return lambda path, x: fixed


@contextlib.contextmanager
def weighted(model: nn.Module, names: Sequence[str], weights: Sequence[float] | Weigher) -> Iterator[None]:
    """Apply attached adapters `names` together, adapter i scaled by `weights[i]` or by `weights(path, x)[..., i]`."""
    names = list(names)
    known = api.adapters(model)
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise DeltatuneError(f"weighted composition needs attached adapters; not attached: {missing or '(none given)'}")
    weigher = weights if callable(weights) else constant_weigher(weights)
    if not callable(weights) and len(weights) != len(names):
        raise DeltatuneError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
    handles = []
    with api.use(model, None):
        try:
            for path, module, slot in slots_of(model):
                present = [i for i, n in enumerate(names) if n in slot]
                if present:
                    hook = functools.partial(_mix_hook, slot, path, names, present, weigher)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


def weighted_sum(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> dict[str, tuple[str, Tensor]]:
    """path -> (host kind, Σᵢ wᵢ·ΔWᵢ in the matrix view) over every module any of the adapters adapts."""
    total: dict[str, tuple[str, Tensor]] = {}
    for name, w in zip(names, weights):
        deltas = loaded_delta_set(model, name, name)
        for path in deltas.paths:
            layer = deltas.get(path)
            if layer.bias is not None or layer.kind == "norm":
                raise DeltatuneError(f"adapter {name!r} updates {'a norm weight' if layer.kind == 'norm' else 'a bias'}"
                                     f" at {path!r}, which a composed LoRA cannot hold; compose weight-only adapters")
            previous = total.get(path, (layer.kind, torch.zeros_like(layer.delta)))[1]
            total[path] = (layer.kind, previous + w * layer.delta)
    return total


def compose_lora(model: nn.Module, names: Sequence[str], weights: Sequence[float], directory: str | Path,
                 max_rank: int | None = None) -> dict:
    """Write Σᵢ wᵢ·ΔWᵢ of attached adapters as a LoRA adapter directory; returns its rank and relative error
    (0 up to float round-off unless `max_rank` truncates)."""
    if len(weights) != len(names) or not names:
        raise DeltatuneError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
    total = weighted_sum(model, names, weights)
    factors, error_sq, norm_sq = {}, 0.0, 0.0
    for path, (kind, matrix) in total.items():
        u, s, v = svd(matrix)
        keep = max(1, min(numerical_rank(s, tuple(matrix.shape)), max_rank or s.numel()))
        root = s[:keep].sqrt()
        factors[path] = ((u[:, :keep] * root).float(), (root[:, None] * v[:, :keep].T).float())  # B (out,k), A (k,in)
        error_sq += float(s[keep:].double().pow(2).sum())
        norm_sq += float(s.double().pow(2).sum())
    rank = max(b.shape[1] for b, _ in factors.values())
    name = "composed_lora"
    api.attach(model, method_config("lora", r=rank, alpha=float(rank), targets=sorted(factors)), name=name)
    try:
        _fill_lora(model, name, factors, rank)
        save(model, directory, name=name)
    finally:
        api.delete(model, name)
    return {"rank": rank, "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0,
            "modules": len(factors)}


def _fill_lora(model: nn.Module, name: str, factors: dict[str, tuple[Tensor, Tensor]], rank: int) -> None:
    """Set a freshly attached LoRA (scaling 1) to B·A per module, zero-padding the rank, through the on-disk
    tensor names (lora_A / lora_B, or lora_embedding_A / _B) rather than parameter attributes."""
    for path, module, slot in slots_of(model):
        if name not in slot:
            continue
        delta, host = slot[name], Host(module, slot)
        b, a = factors[path]
        b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
        current = delta.state_tensors(host)
        a_key = next(k for k in current if "_A" in k)
        b_key = next(k for k in current if "_B" in k and not k.endswith("bias"))
        delta.load_state_tensors({a_key: a.reshape(current[a_key].shape).to(current[a_key].dtype),
                                  b_key: b.reshape(current[b_key].shape).to(current[b_key].dtype)}, host)
