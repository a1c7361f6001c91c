"""The method registry: one decorator registers a method's name, config, delta class, paper and host layers.

Capabilities (merge, mixed-batch path, PEFT format) are derived from the code — which contract methods a delta class
overrides and whether it declares a PEFT mapping — so `deltatune methods` never lies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import DeltaConfig, check_field_names
from .delta import Delta, is_mergeable, mixed_batch_path
from .errors import DeltatuneError, one_of
from .hosts import MODULE_KIND, WEIGHT_KINDS, host_kind


@dataclass(frozen=True)
class PeftFormat:
    """How a method maps to PEFT's adapter_config.json (the tensor names are the delta's `state_tensors` keys).

    Attributes:
        peft_type: PEFT's `peft_type` value.
        to_peft: config -> the PEFT config fields specific to this method.
        from_peft: PEFT config dict -> keyword arguments for this method's config.
        claims: whether a PEFT config of `peft_type` belongs to this method (several methods may share a type).
    from_peft refuses (DeltatuneError) any PEFT feature it cannot reproduce.
    """

    peft_type: str
    to_peft: Callable[[Any], dict]
    from_peft: Callable[[dict], dict]
    claims: Callable[[dict], bool]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[DeltaConfig]
    delta: type[Delta]
    family: str
    paper: str
    hosts: tuple[str, ...]
    peft: PeftFormat | None

    def accepts(self, module: nn.Module) -> bool:
        kind = host_kind(module)
        return kind in self.hosts or (kind is None and MODULE_KIND in self.hosts)

    @property
    def mergeable(self) -> bool:
        return is_mergeable(self.delta)

    @property
    def mixed_batch(self) -> str:
        return mixed_batch_path(self.delta)

    def capabilities(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "merge": self.mergeable,
            "mixed_batch": self.mixed_batch,
            "peft_format": self.peft.peft_type if self.peft else None,
            "identity_at_init": self.delta.identity_at_init,
            "hosts": list(self.hosts),
        }


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type[DeltaConfig],
    family: str,
    paper: str,
    hosts: tuple[str, ...] = WEIGHT_KINDS,
    peft: PeftFormat | None = None,
) -> Callable[[type[Delta]], type[Delta]]:
    """Class decorator registering a Delta subclass as method `name`."""

    def decorate(delta_cls: type[Delta]) -> type[Delta]:
        if name in _METHODS:
            raise DeltatuneError(f"method {name!r} is registered twice")
        if "method" in config.__dict__ and config.method not in ("", name):
            raise DeltatuneError(f"config class {config.__name__} already belongs to method {config.method!r}")
        config.method = name
        _METHODS[name] = MethodSpec(name, config, delta_cls, family, paper, tuple(hosts), peft)
        return delta_cls

    return decorate


def _load_builtin_methods() -> None:
    # By module path, so that nothing else needs to import the method modules first.
    importlib.import_module("deltatune.methods")


def list_methods() -> dict[str, MethodSpec]:
    """Every registered method by name."""
    _load_builtin_methods()
    return dict(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name not in _METHODS:
        raise one_of("method", name, _METHODS)
    return _METHODS[name]


def config(method: str, **fields: Any) -> DeltaConfig:
    """A method's config from its name and fields, e.g. `deltatune.config(<method>, r=8, targets=["q_proj"])`."""
    spec = get_method(method)
    check_field_names(spec.config, fields)
    return spec.config(**fields)


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Inverse of `DeltaConfig.to_dict`."""
    if not isinstance(data, dict) or "method" not in data:
        raise DeltatuneError("a config dict needs a 'method' key naming a registered method")
    fields = {k: v for k, v in data.items() if k != "method"}
    return config(data["method"], **fields)


def spec_of(cfg: DeltaConfig) -> MethodSpec:
    if not isinstance(cfg, DeltaConfig):
        raise DeltatuneError(
            f"expected a deltatune config (from deltatune.config(method, ...)), got {type(cfg).__name__}"
        )
    return get_method(cfg.method)
