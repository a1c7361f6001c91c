"""Optimizers by name, for recipes (`optimizer: {name: ..., options: {...}}`).

A builder takes the model and the recipe's optimizer section and returns a torch optimizer over the trainable delta
parameters. `adamw` (with LoRA+ through `lora_plus_ratio`) is built in; methods and algorithms that need their own
optimizer (LoRA-FA, LoRA-Pro, a Riemannian preconditioner, GaLore-style projection, ...) register one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import one_of
from ..optim import param_groups

Builder = Callable[[nn.Module, object], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        OPTIMIZERS[name] = builder
        return builder

    return decorate


@register_optimizer("adamw")
def build_adamw(model: nn.Module, spec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.lr, spec.lora_plus_ratio, spec.weight_decay)
    return torch.optim.AdamW(groups, betas=tuple(spec.betas), eps=spec.eps, **spec.options)


def registered() -> dict[str, Builder]:
    """Every optimizer, including those `deltatune.algorithms` registers (lorafa, lora_pro, galore, lisa, ...)."""
    import importlib

    importlib.import_module("deltatune.algorithms")  # imported late: the algorithms build on this module
    return OPTIMIZERS


def build_optimizer(model: nn.Module, spec) -> torch.optim.Optimizer:
    optimizers = registered()
    if spec.name not in optimizers:
        raise one_of("optimizer", spec.name, optimizers)
    return optimizers[spec.name](model, spec)
