"""Merge methods: one pure tensor function each, registered by decorator; the signature is the schema.

    @merge_method("ties", paper="https://arxiv.org/abs/2306.01708")
    def ties(tensors: list[Tensor], base: Tensor, *, weight: PerModel[float] = 1.0, density: PerModel[float] = 1.0,
             normalize: bool = True) -> Tensor: ...

- Positional parameters are the inputs: `tensors` (one tensor per merged model, in order), optionally `base`
  (annotated `Tensor`: required; `Tensor | None`: optional), and optionally `statistics` (one tensor or None per
  model: a diagonal Fisher, a Gram matrix — read from each model's statistics file by tensor name). A method
  whose only input is `factors` merges LoRA factors [(A, B), ...] into one (A, B) (federated aggregation, LoRA-LEGO).
- Keyword-only parameters are the method's settings, checked against their annotations (resolved with
  `typing.get_type_hints`, so postponed annotations and `X | None` work): bool, int, float, str, Literal, unions,
  and `PerModel[T]` — one value per merged model (a single value is repeated). A parameter annotated `TensorInfo`
  receives the tensor's name and layer position from the caller (LiNeS, per-tensor seeds).
- A parameter without an annotation, or with one the checker does not understand, is refused at registration.

A family of methods over one function (TIES, DARE, breadcrumbs, DELLA) registers the same function several times
with other defaults (`defaults=`) and with the settings that do not apply hidden (`hide=`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
import zlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ..core.config import check_value
from ..core.errors import DeltatuneError, one_of

T = TypeVar("T")


class PerModel(Generic[T]):
    """Annotation marker: one value per merged model (the function receives a list)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a merge function may know about the tensor it merges.

    Attributes:
        name: the tensor's name in the checkpoint (or the module path for adapters).
        layer: index of the transformer layer the tensor belongs to, None outside the layer stack.
        num_layers: number of layers in the stack (1 when unknown).
    """

    name: str = ""
    layer: int | None = None
    num_layers: int = 1

    @property
    def depth(self) -> float:
        """Position in the stack in [0, 1]: 0 for the first layer and for tensors outside the stack."""
        if self.layer is None or self.num_layers <= 1:
            return 0.0
        return self.layer / (self.num_layers - 1)


def generator_for(seed: int, info: TensorInfo) -> torch.Generator:
    """A generator seeded from the user's seed and the tensor's name, so a tensor's random draw does not depend
    on which tensors were merged before it (reproducible, order-free)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(info.name.encode())) % (2**63))


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # as written in configs (a trailing underscore of the Python name is dropped: lambda_ -> lambda)
    arg: str  # the Python parameter name
    hint: Any  # the value type (the inner type for per-model settings)
    per_model: bool
    default: Any  # inspect.Parameter.empty when required


@dataclasses.dataclass(frozen=True)
class MergeMethodSpec:
    name: str
    fn: Callable[..., Tensor]
    paper: str
    base: str  # "required" | "optional" | "unused"
    min_models: int
    max_models: int | None
    settings: dict[str, Setting]
    info_arg: str | None
    randomised: bool
    hidden: dict[str, Any]  # settings a family entry hides -> the value always passed (Setting, value)
    uses_statistics: bool = False
    on_factors: bool = False  # takes LoRA factors [(A, B), ...] and returns (A, B): adapters only

    def resolve(self, given: dict[str, Any], n_models: int, where: str = "") -> dict[str, Any]:
        """Checked keyword arguments for `fn` from `given` (config names; per-model values as lists)."""
        where = where or self.name
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            raise DeltatuneError(f"{where}: unknown parameter(s) {', '.join(unknown)} for merge method {self.name!r}; "
                                 f"valid: {', '.join(self.settings) or '(none)'}")
        out = {}
        for setting in self.settings.values():
            value = given.get(setting.name, setting.default)
            if value is inspect.Parameter.empty:
                raise DeltatuneError(f"{where}: merge method {self.name!r} needs parameter {setting.name!r}")
            out[setting.arg] = _check_setting(setting, value, n_models, f"{where}: {setting.name}")
        for setting, value in self.hidden.values():
            out[setting.arg] = _check_setting(setting, value, n_models, f"{where}: {setting.name}")
        return out

    def check_inputs(self, n_models: int, has_base: bool, where: str = "") -> None:
        where = where or self.name
        if self.base == "required" and not has_base:
            raise DeltatuneError(f"{where}: merge method {self.name!r} needs a base model; set base_model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            span = (f"exactly {self.min_models}" if self.min_models == self.max_models
                    else f"at least {self.min_models}" if self.max_models is None
                    else f"{self.min_models} to {self.max_models}")
            raise DeltatuneError(f"{where}: merge method {self.name!r} takes {span} model(s) besides the base, "
                                 f"got {n_models}")

    def __call__(self, tensors: list[Tensor], base: Tensor | None = None, info: TensorInfo | None = None,
                 statistics: list[Tensor | None] | None = None, **params: Any) -> Tensor:
        """Run the method on one tensor with settings given by config name (checked here)."""
        self.check_inputs(len(tensors), base is not None)
        kwargs = self.resolve(params, len(tensors))
        return self.call_resolved(tensors, base, info or TensorInfo(), kwargs, statistics)

    def call_resolved(self, tensors: list[Tensor], base: Tensor | None, info: TensorInfo,
                      kwargs: dict[str, Any], statistics: list[Tensor | None] | None = None) -> Tensor:
        if self.info_arg is not None:
            kwargs[self.info_arg] = info
        if self.base == "unused":
            return self.fn(tensors, **kwargs)
        if self.uses_statistics:
            return self.fn(tensors, base, statistics or [None] * len(tensors), **kwargs)
        return self.fn(tensors, base, **kwargs)


def _check_setting(setting: Setting, value: Any, n_models: int, where: str) -> Any:
    if not setting.per_model:
        return check_value(value, setting.hint, where)
    values = value if isinstance(value, (list, tuple)) else [value] * n_models
    if len(values) != n_models:
        raise DeltatuneError(f"{where}: needs one value per model ({n_models}), got {len(values)}")
    return [check_value(v, setting.hint, where) for v in values]


_MERGE_METHODS: dict[str, MergeMethodSpec] = {}


def merge_method(name: str, *, paper: str, models: tuple[int, int | None] = (1, None),
                 defaults: dict[str, Any] | None = None, hide: tuple[str, ...] = ()) -> Callable:
    """Register `fn` as merge method `name` (returns `fn` unchanged, so a family can register it again)."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _MERGE_METHODS:
            raise DeltatuneError(f"merge method {name!r} is registered twice")
        _MERGE_METHODS[name] = _build_spec(name, fn, paper, models, defaults or {}, hide)
        return fn

    return decorate


def _build_spec(name: str, fn: Callable, paper: str, models: tuple[int, int | None], defaults: dict[str, Any],
                hide: tuple[str, ...]) -> MergeMethodSpec:
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    for p in params:
        if p.name not in hints:
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} has no annotation")
    inputs = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    names = [p.name for p in inputs]
    if names not in (["tensors"], ["tensors", "base"], ["tensors", "base", "statistics"], ["factors"]):
        raise TypeError(f"merge method {name!r}: positional parameters must be (tensors), (tensors, base), "
                        "(tensors, base, statistics) or (factors)")
    base = "unused"
    if len(inputs) >= 2:
        base = "required" if hints["base"] is Tensor else "optional"
    settings, info_arg, hidden = {}, None, {}
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints[p.name]
        if hint is TensorInfo:
            info_arg = p.name
            continue
        per_model = typing.get_origin(hint) is PerModel
        inner = typing.get_args(hint)[0] if per_model else hint
        check_value(p.default if p.default is not inspect.Parameter.empty else None, inner | None, "")
        setting = Setting(p.name.rstrip("_"), p.name, inner, per_model, defaults.get(p.name.rstrip("_"), p.default))
        if setting.name not in hide:
            settings[setting.name] = setting
        else:
            hidden[setting.name] = (setting, setting.default)
    unknown = set(defaults) - set(settings) - set(hidden)
    if unknown:
        raise TypeError(f"merge method {name!r}: defaults for unknown parameter(s) {sorted(unknown)}")
    return MergeMethodSpec(name, fn, paper, base, models[0], models[1], settings, info_arg, "seed" in settings,
                           hidden, "statistics" in names, names == ["factors"])


def _load_builtin() -> None:
    from . import methods_basic, methods_factors, methods_papers  # noqa: F401  (registration happens on import)


def merge_methods() -> dict[str, MergeMethodSpec]:
    """Every registered merge method by name."""
    _load_builtin()
    return dict(_MERGE_METHODS)


def get_merge_method(name: str) -> MergeMethodSpec:
    _load_builtin()
    if name not in _MERGE_METHODS:
        raise one_of("merge method", name, _MERGE_METHODS)
    return _MERGE_METHODS[name]
