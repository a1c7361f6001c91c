"""Data-driven initialisations of an attached LoRA-family adapter: `initialize(model, adapter, name, batches)`.

The trainer calls this entry point for a recipe's `initialize: {name: ..., batches: N, options: {...}}`. Every init
leaves the model's output unchanged at step 0: EVA starts B at zero; the others keep a frozen copy of their start
(see `methods/lora.py`), which is saved as a plain LoRA relative to the original base.

- EVA (Paischer et al., 2024, https://arxiv.org/abs/2410.07170): A = the top right-singular vectors of each
  layer's (centred) input activations, B = 0; the total rank budget Σ r is redistributed across layers by explained
  variance ratio (at most round(rho·r) per layer, at least 1 here), alpha rescaled by new_r / r (PEFT's default).
- CorDA (Yang et al., 2024, https://arxiv.org/abs/2406.05223): SVD of W·C with C the input covariance,
  W = U·Σ·(Vᵀ·C⁻¹); "ipm" (instruction-previewed) trains the r largest components, "kpm" (knowledge-preserved)
  the r smallest, as PEFT (damped inverse, per-batch max normalisation).
- LoRA-GA (Wang et al., 2024, https://arxiv.org/abs/2407.05000): G = mean ∂L/∂W, G = U·S·Vᵀ; A₀ = ζ·V[:, r:2r]ᵀ,
  B₀ = ζ·U[:, :r] (direction "A2rBr", the paper's; "ArB2r" swaps the halves), ζ = d_out^¼/√γ ("stable") or 1
  ("unit"). The first gradient step then moves s·B·A along −s²ζ²·(best rank-2r approximation of G).
  `style="peft"` reproduces PEFT's `init_lora_weights="lora_ga"` instead (A = Vᵀ rows, B = ζ·U·S; pass
  direction="ArB2r", PEFT's default).
- LoRA-One (Zhang et al., 2025, https://arxiv.org/abs/2502.01235): −G = U·S·Vᵀ, B₀ = ζ·U_r·√(S_r/S₁),
  A₀ = ζ·√(S_r/S₁)·V_rᵀ: s·B₀·A₀ is proportional to the best rank-r approximation of one full gradient step (the
  scale is normalised by S₁, since the offset keeps the output unchanged).
- LoRA-SB (Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557), for `lora_sb` adapters: frozen B = U_r and
  A = V_rᵀ from the SVD of −G, trainable R: the first step on R is the best rank-r approximation of the full step.
Data-free inits (pissa, milora, olora, nlora, loftq) can be applied through the same entry point; their options
are the config's `init_options`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..core import api
from ..core.errors import DeltatuneError, one_of
from ..core.hosts import LINEAR_KINDS, to_matrix
from ..core.slot import Host, require_state
from ..methods.lora import LoraDelta, pattern_value
from ..methods.lora_init import DATA_FREE
from ..methods.lora_sb import LoraSbDelta
from .collect import adapter_hosts, as_batches, collect_gradients, collect_inputs


@dataclasses.dataclass
class InitPlan:
    """What an init decided: the config fields to change and, per module path, the start (down (r, in), up (out, r))
    or, for LoRA-SB, the gradient SVD (u, s, vh)."""

    config: dict
    starts: dict[str, tuple[Tensor, ...]]


InitFn = Callable[..., InitPlan]
INITS: dict[str, InitFn] = {}


def register_init(name: str) -> Callable[[InitFn], InitFn]:
    def decorate(fn: InitFn) -> InitFn:
        INITS[name] = fn
        return fn

    return decorate


def available() -> list[str]:
    return sorted({*INITS, *DATA_FREE})


def initialize(model: nn.Module, adapter: str, name: str, batches: Iterable = (), progress: bool = True,
               **options) -> None:
    """Initialise adapter `adapter` of `model` with init `name` (eva, corda, lora_ga, lora_one, lora_sb, or a
    data-free one) from `batches`; the adapter is rebuilt in place with its new config (init, ranks) and routing is
    kept. Call it before building the optimizer."""
    state = require_state(model)
    if adapter not in state.adapters:
        raise one_of("adapter", adapter, state.adapters)
    if name not in INITS and name not in DATA_FREE:
        raise one_of("init", name, available())
    if adapter in state.merged:
        raise DeltatuneError(f"adapter {adapter!r} is merged; unmerge it before initialising it")
    config = state.adapters[adapter].config
    if name in DATA_FREE:
        _check_lora(model, adapter, name)
        _rebuild(model, adapter, config.replace(init=name, init_options=dict(options)))
        return
    plan = INITS[name](model, adapter, as_batches(batches), progress=progress, **options)
    _rebuild(model, adapter, config.replace(**plan.config))
    hosts = adapter_hosts(model, adapter)
    for path, start in plan.starts.items():
        hosts[path][1].set_start(*start)


def _check_lora(model: nn.Module, adapter: str, name: str, cls: type = LoraDelta) -> dict:
    hosts = adapter_hosts(model, adapter)
    wrong = sorted({type(d).__name__ for _, d in hosts.values() if not isinstance(d, cls)})
    if wrong:
        raise DeltatuneError(f"init {name!r} applies to {cls.__name__} adapters (lora, rslora, dora, ...); adapter "
                             f"{adapter!r} is {', '.join(wrong)}")
    return hosts


def _rebuild(model: nn.Module, adapter: str, config) -> None:
    """Replace the adapter by a fresh one with `config` on the same modules, keeping the routing."""
    state = require_state(model)
    paths = list(state.adapters[adapter].paths)
    routing = (state.active, state.rows, state.block)
    api.delete(model, adapter)
    api.attach_at(model, config, paths, adapter)
    state.active, state.rows, state.block = routing
    state.reset_plans()


def _linear_only(hosts: dict, name: str) -> dict:
    """Activation statistics are defined for Linear / Conv1D inputs; other hosts keep their default init."""
    kept = {p: hd for p, hd in hosts.items() if hd[1].info.kind in LINEAR_KINDS}
    skipped = sorted(set(hosts) - set(kept))
    if skipped:
        warnings.warn(f"{name}: {len(skipped)} non-linear module(s) keep the default init: {skipped[:3]}", stacklevel=3)
    if not kept:
        raise DeltatuneError(f"{name} needs Linear / Conv1D modules in the adapter; it has none")
    return kept


def exact(path: str) -> str:
    """A rank_pattern / alpha_pattern key that matches exactly this module path."""
    return re.escape(path)


# ---- EVA --------------------------------------------------------------------------------------------------------------
class Moments:
    """Running sums for the covariance of a layer's inputs."""

    def __init__(self) -> None:
        self.n, self.total, self.gram = 0, None, None

    def add(self, rows: Tensor) -> None:
        total, gram = rows.sum(0), rows.t() @ rows
        self.total = total if self.total is None else self.total + total
        self.gram = gram if self.gram is None else self.gram + gram
        self.n += rows.shape[0]

    def covariance(self) -> Tensor:
        if self.n < 2:
            raise DeltatuneError("eva: a layer saw fewer than 2 counted tokens; give more batches")
        mean = self.total / self.n
        return (self.gram - self.n * torch.outer(mean, mean)) / (self.n - 1)


def principal_components(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues descending (d,), components (d, d) as rows) of a covariance."""
    values, vectors = torch.linalg.eigh(covariance.double())
    order = values.argsort(descending=True)
    return values[order].clamp_min(0).float(), vectors[:, order].t().float()


def eva_ranks(ratios: dict[str, Tensor], ranks: dict[str, int], rho: float) -> dict[str, int]:
    """PEFT's redistribution: the budget Σ r goes to the globally largest explained-variance ratios (at most
    round(rho·r) per layer); a layer left with 0 takes one from the layer holding the most."""
    pool = [(float(v), path) for path, r in ranks.items() for v in ratios[path][: max(1, round(r * rho))]]
    pool.sort(key=lambda item: -item[0])
    counts = {path: 0 for path in ranks}
    for _, path in pool[: sum(ranks.values())]:
        counts[path] += 1
    for path in [p for p, c in counts.items() if c == 0]:
        donor = max(counts, key=counts.get)
        counts[donor] -= 1
        counts[path] = 1
    return counts


@register_init("eva")
def eva_init(model: nn.Module, adapter: str, batches: list, *, progress: bool = True, rho: float = 2.0,
             use_label_mask: bool = True, whiten: bool = False, adjust_scaling: bool = True) -> InitPlan:
    if rho < 1.0:
        raise DeltatuneError(f"eva: rho must be >= 1 (1 = no redistribution), got {rho}")
    hosts = _linear_only(_check_lora(model, adapter, "eva"), "eva")
    moments: dict[str, Moments] = {}
    groups = collect_inputs(model, {p: m for p, (m, _) in hosts.items()}, batches,
                            lambda path, rows: moments.setdefault(path, Moments()).add(rows),
                            use_labels=use_label_mask, progress=progress, desc="eva")
    leader = {member: head for head, members in groups.items() for member in members}
    spectra = {head: principal_components(m.covariance()) for head, m in moments.items()}
    ratios = {p: spectra[leader[p]][0] / spectra[leader[p]][0].sum().clamp_min(1e-30) for p in hosts}
    counts = eva_ranks(ratios, {p: d.r for p, (_, d) in hosts.items()}, rho)
    config = require_state(model).adapters[adapter].config
    starts, ranks, alphas = {}, {}, {}
    for path, (_, delta) in hosts.items():
        values, components = spectra[leader[path]]
        k = counts[path]
        down = components[:k]
        if whiten:
            singular = (values[:k] * (moments[leader[path]].n - 1)).sqrt().clamp_min(1e-12)
            down = down / singular.sqrt().unsqueeze(1)
        starts[path] = (down, torch.zeros(delta.info.out_features, k))
        if k != delta.r:
            ranks[exact(path)] = k
            if adjust_scaling:
                alphas[exact(path)] = pattern_value(config.alpha_pattern, path, config.alpha) * k / delta.r
    patterns = {"rank_pattern": {**ranks, **config.rank_pattern}, "alpha_pattern": {**alphas, **config.alpha_pattern}}
    return InitPlan({"init": "eva", **patterns}, starts)


# ---- CorDA ------------------------------------------------------------------------------------------------------------
def damped_inverse(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(C + λI, its inverse) with λ = damp·mean(diag C), damp doubled from 0.01 until the inverse is accurate."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype)
    damp = 0.01
    for _ in range(30):
        fixed = covariance + eye * covariance.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            return fixed, inverse
        damp *= 2
    raise DeltatuneError("corda: the input covariance could not be inverted; give more (or more varied) batches")


def corda_factors(weight: Tensor, covariance: Tensor, r: int, scaling: float, mode: str) -> tuple[Tensor, Tensor]:
    fixed, inverse = damped_inverse(covariance)
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inverse).t()  # W = U·diag(S)·Vᵀ exactly
    keep = slice(0, r) if mode == "ipm" else slice(s.shape[0] - r, None)
    root = (s[keep] / scaling).sqrt()
    return root.unsqueeze(1) * v[:, keep].t(), u[:, keep] * root


@register_init("corda")
def corda_init(model: nn.Module, adapter: str, batches: list, *, progress: bool = True, mode: str = "ipm") -> InitPlan:
    if mode not in ("ipm", "kpm"):
        raise DeltatuneError(f"corda: mode must be 'ipm' (instruction-previewed) or 'kpm' (knowledge-preserved), "
                             f"got {mode!r}")
    hosts = _linear_only(_check_lora(model, adapter, "corda"), "corda")
    sums: dict[str, list] = {}

    def add(path: str, rows: Tensor) -> None:
        rows = rows / rows.max().abs().clamp_min(1e-12)  # PEFT's per-batch normalisation
        entry = sums.setdefault(path, [0, 0.0])
        entry[0] += 1
        entry[1] = entry[1] + rows.t() @ rows

    groups = collect_inputs(model, {p: m for p, (m, _) in hosts.items()}, batches, add, use_labels=False,
                            progress=progress, desc=f"corda-{mode}")
    leader = {member: head for head, members in groups.items() for member in members}
    starts = {}
    for path, (module, delta) in hosts.items():
        count, gram = sums[leader[path]]
        weight = to_matrix(delta.info, Host(module, module.deltatune).weight()).float()
        delta.check_rank(delta.r, min(weight.shape))
        starts[path] = corda_factors(weight, gram / count, delta.r, delta.scaling, mode)
    return InitPlan({"init": f"corda_{mode}"}, starts)


# ---- gradient inits -------------------------------------------------------------------------------------------------
def stable_scale(out_features: int, gamma: float, scale: str) -> float:
    if scale == "unit":
        return 1.0
    if scale != "stable":
        raise DeltatuneError(f"scale must be 'stable' or 'unit', got {scale!r}")
    return out_features**0.25 / math.sqrt(gamma)


def lora_ga_factors(grad: Tensor, r: int, zeta: float, direction: str, style: str = "paper") -> tuple[Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    if 2 * r > vh.shape[0]:
        raise DeltatuneError(f"lora_ga needs 2r <= min(out, in) = {vh.shape[0]}, got r={r}; lower r")
    first, second = slice(0, r), slice(r, 2 * r)
    a_part, b_part = {"A2rBr": (second, first), "ArB2r": (first, second)}[direction]
    if style == "peft":  # PEFT's LoraGA: B carries the singular values and ζ, A the bare singular vectors
        return vh[a_part], u[:, b_part] * s[b_part] * zeta
    return zeta * vh[a_part], zeta * u[:, b_part]


@register_init("lora_ga")
def lora_ga_init(model: nn.Module, adapter: str, batches: list, *, progress: bool = True, direction: str = "A2rBr",
                 scale: str = "stable", gamma: float = 16.0, style: str = "paper", loss_fn=None) -> InitPlan:
    if direction not in ("A2rBr", "ArB2r"):
        raise DeltatuneError(f"lora_ga: direction must be 'A2rBr' (the paper's) or 'ArB2r', got {direction!r}")
    if style not in ("paper", "peft"):
        raise DeltatuneError(f"lora_ga: style must be 'paper' (ζ on both factors) or 'peft' (B = ζ·U·S, A = Vᵀ), "
                             f"got {style!r}")
    hosts = _check_lora(model, adapter, "lora_ga")
    grads = collect_gradients(model, {p: m for p, (m, _) in hosts.items()}, batches, loss_fn=loss_fn,
                              progress=progress, desc="lora_ga")
    starts = {p: lora_ga_factors(grads[p], d.r, stable_scale(d.info.out_features, gamma, scale), direction, style)
              for p, (_, d) in hosts.items()}
    return InitPlan({"init": "lora_ga"}, starts)


def top_gradient_svd(grad: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-r SVD of the full step −G: (U_r, S_r / S₁, V_rᵀ)."""
    u, s, vh = torch.linalg.svd(-grad, full_matrices=False)
    if r > s.shape[0]:
        raise DeltatuneError(f"the gradient init needs r <= min(out, in) = {s.shape[0]}, got r={r}; lower r")
    return u[:, :r], s[:r] / s[0].clamp_min(1e-30), vh[:r]


@register_init("lora_one")
def lora_one_init(model: nn.Module, adapter: str, batches: list, *, progress: bool = True, scale: str = "stable",
                  gamma: float = 16.0, loss_fn=None) -> InitPlan:
    hosts = _check_lora(model, adapter, "lora_one")
    grads = collect_gradients(model, {p: m for p, (m, _) in hosts.items()}, batches, loss_fn=loss_fn,
                              progress=progress, desc="lora_one")
    starts = {}
    for path, (_, delta) in hosts.items():
        u, s, vh = top_gradient_svd(grads[path], delta.r)
        root = stable_scale(delta.info.out_features, gamma, scale) * s.sqrt()
        starts[path] = (root.unsqueeze(1) * vh, u * root)
    return InitPlan({"init": "lora_one"}, starts)


@register_init("lora_sb")
def lora_sb_init(model: nn.Module, adapter: str, batches: list, *, progress: bool = True, loss_fn=None) -> InitPlan:
    hosts = _check_lora(model, adapter, "lora_sb", LoraSbDelta)
    grads = collect_gradients(model, {p: m for p, (m, _) in hosts.items()}, batches, loss_fn=loss_fn,
                              progress=progress, desc="lora_sb")
    starts = {p: top_gradient_svd(grads[p], d.r) for p, (_, d) in hosts.items()}
    return InitPlan({"init": "gradient"}, starts)
