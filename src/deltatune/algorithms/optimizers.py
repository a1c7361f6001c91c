"""The optimizers recipes can name (`optimizer: {name: ..., options: {...}}`), registered on import with
`deltatune.train.optimizers.register_optimizer`. Each builder reads the recipe's lr, weight_decay, betas, eps,
lora_plus_ratio and its own options (an unknown option is an error listing the valid ones).

| name       | what it does                                                        | options (defaults)                      |
|------------|---------------------------------------------------------------------|-----------------------------------------|
| lorafa     | LoRA-FA: A frozen, B's gradient projected                           | —                                       |
| riemannian | scaled-GD preconditioner on (A, B), then AdamW                      | damping (1e-2)                          |
| allora     | per-row gradient scale 1/√(‖row‖² + 1/η²) on LoRA factors, AdamW    | eta (1.0)                               |
| lora_pro   | LoRA-Pro's adjusted factor updates                                  | adam (true), sylvester (true)           |
| gor        | AdamW + the GOR orthogonality regulariser on LoRA factors           | weight (1e-4), group_size (4)           |
| galore     | low-rank projected AdamW (SVD basis) for matrices                   | rank (8), update_every (200), scale (0.25) |
| flora      | the same with seeded random projections                             | rank, update_every, scale, seed (0)     |
| lisa       | train `layers` random layers, redrawn every `every` steps           | layers (2), every (20), seed (0)        |
| owlore     | LISA with outlier-weighted layer probabilities                      | layers, every, seed, threshold (3.0)    |
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..optim import param_groups
from ..train.optimizers import register_optimizer
from .layerwise import LayerSampler, LayerwiseAdamW, outlier_ratios
from .lowrank_grads import (
    LoraProOptimizer,
    allora_transform,
    check_finite,
    gor_transform,
    lora_pairs,
    lorafa_transform,
    riemannian_transform,
)
from .projection import ProjectedAdamW


def options(spec, defaults: dict, name: str) -> dict:
    """The spec's options over `defaults`; unknown keys are refused."""
    given = dict(spec.options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none"
        raise DeltatuneError(f"optimizer {name}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    return {**defaults, **given}


def _groups(model: nn.Module, spec) -> list[dict]:
    return param_groups(model, spec.lr, spec.lora_plus_ratio, spec.weight_decay)


def _adam_kwargs(spec) -> dict:
    return {"lr": spec.lr, "betas": tuple(spec.betas), "eps": spec.eps}


class TransformedAdamW(torch.optim.AdamW):
    """AdamW whose step first rewrites gradients with `transform()` (kept out of the saved state)."""

    def __init__(self, groups: list[dict], transform: Callable[[], None], **kwargs) -> None:
        super().__init__(groups, **kwargs)
        self.transform = transform

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise DeltatuneError("this optimizer rewrites gradients before stepping and takes no closure")
        self.transform()
        return super().step()


def _pairs_or_error(model: nn.Module, name: str):
    pairs = lora_pairs(model)
    if not pairs:
        raise DeltatuneError(f"optimizer {name} works on LoRA-family adapters (lora, rslora, dora, ...); the model "
                             "has no trainable one")
    return pairs


@register_optimizer("lorafa")
def build_lorafa(model: nn.Module, spec) -> torch.optim.Optimizer:
    options(spec, {}, "lorafa")
    pairs = _pairs_or_error(model, "lorafa")
    for pair in pairs:  # A stays at its initial value for the whole run
        pair.lora_a.requires_grad_(False)
    return TransformedAdamW(_groups(model, spec), lambda: lorafa_transform(pairs), **_adam_kwargs(spec))


@register_optimizer("riemannian")
def build_riemannian(model: nn.Module, spec) -> torch.optim.Optimizer:
    opts = options(spec, {"damping": 1e-2}, "riemannian")
    pairs = _pairs_or_error(model, "riemannian")
    damping = check_finite(float(opts["damping"]), "damping")
    return TransformedAdamW(_groups(model, spec), lambda: riemannian_transform(pairs, damping), **_adam_kwargs(spec))


@register_optimizer("allora")
def build_allora(model: nn.Module, spec) -> torch.optim.Optimizer:
    opts = options(spec, {"eta": 1.0}, "allora")
    params = [p for pair in _pairs_or_error(model, "allora") for p in (pair.lora_a, pair.lora_b)]
    eta = check_finite(float(opts["eta"]), "eta")
    return TransformedAdamW(_groups(model, spec), lambda: allora_transform(params, eta), **_adam_kwargs(spec))


@register_optimizer("gor")
def build_gor(model: nn.Module, spec) -> torch.optim.Optimizer:
    opts = options(spec, {"weight": 1e-4, "group_size": 4}, "gor")
    pairs = _pairs_or_error(model, "gor")
    weight, size = check_finite(float(opts["weight"]), "weight"), int(opts["group_size"])
    if size < 1:
        raise DeltatuneError(f"optimizer gor: group_size must be >= 1, got {size}")
    return TransformedAdamW(_groups(model, spec), lambda: gor_transform(pairs, weight, size), **_adam_kwargs(spec))


@register_optimizer("lora_pro")
def build_lora_pro(model: nn.Module, spec) -> torch.optim.Optimizer:
    opts = options(spec, {"adam": True, "sylvester": True}, "lora_pro")
    pairs = _pairs_or_error(model, "lora_pro")
    return LoraProOptimizer(_groups(model, spec), pairs, adam=bool(opts["adam"]), use_sylvester=bool(opts["sylvester"]),
                            **_adam_kwargs(spec))


def _projected(model: nn.Module, spec, name: str) -> torch.optim.Optimizer:
    defaults = {"rank": 8, "update_every": 200, "scale": 0.25} | ({"seed": 0} if name == "flora" else {})
    opts = options(spec, defaults, name)
    if int(opts["rank"]) < 1 or int(opts["update_every"]) < 1:
        raise DeltatuneError(f"optimizer {name}: rank and update_every must be >= 1")
    return ProjectedAdamW(_groups(model, spec), mode=name, rank=int(opts["rank"]),
                          update_every=int(opts["update_every"]), scale=float(opts["scale"]),
                          seed=int(opts.get("seed", 0)), weight_decay=spec.weight_decay, **_adam_kwargs(spec))


def _layerwise(model: nn.Module, spec, name: str) -> torch.optim.Optimizer:
    defaults = {"layers": 2, "every": 20, "seed": 0} | ({"threshold": 3.0} if name == "owlore" else {})
    opts = options(spec, defaults, name)
    if int(opts["every"]) < 1:
        raise DeltatuneError(f"optimizer {name}: every must be >= 1, got {opts['every']}")
    groups = _groups(model, spec)  # built while every parameter still trains
    sampler = LayerSampler(model, int(opts["layers"]), int(opts["seed"]))
    if name == "owlore":
        sampler.weights = [max(w, 1e-12) for w in outlier_ratios(model, sampler.indices, float(opts["threshold"])).values()]
    return LayerwiseAdamW(groups, sampler, int(opts["every"]), weight_decay=spec.weight_decay, **_adam_kwargs(spec))


# The two variants of each family share one builder, told apart by the registered name.
for _name, _builder in (("galore", _projected), ("flora", _projected), ("lisa", _layerwise), ("owlore", _layerwise)):
    register_optimizer(_name)(functools.partial(_builder, name=_name))
