"""Config dataclasses: the fields every method shares, and checking of field values against their annotations.

A method's config is a frozen, keyword-only dataclass that subclasses `DeltaConfig`. Field values are checked once,
at construction, against the field annotations (so `r="8"` or `dropout=2` fail with the field's name), and the
config round-trips through JSON as `{"method": <name>, <field>: <value>, ...}`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union

from .errors import DeltatuneError

TargetSpec = Union[str, list[str], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaConfig:
    """Fields shared by every method: where the delta goes.

    Attributes:
        targets: which modules to adapt: a regex (full match on the module path), a list of names (each matching
            a path exactly or as a dotted suffix), or "all-linear" (every Linear / transformers Conv1D except the
            output head). None picks a default for known transformers architectures.
        exclude: modules to leave out, in the same forms as `targets`.
        layers: keep only modules whose layer index (the number after `layers_pattern` in the path) is listed.
        layers_pattern: the container name(s) whose numeric child is the layer index, e.g. "layers" or "h";
            None tries the usual ones.
    """

    method: ClassVar[str] = ""

    targets: TargetSpec = None
    exclude: TargetSpec = None
    layers: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = check_value(value, hints[field.name], f"{self.method or type(self).__name__}.{field.name}")
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        self.validate()

    def validate(self) -> None:
        """Value checks beyond types; methods override and call super()."""
        if isinstance(self.targets, list) and not self.targets:
            raise DeltatuneError(f"{self.method}: targets is an empty list; name at least one module or use 'all-linear'")

    def default_targets(self, model) -> "TargetSpec":
        """Where the method goes when `targets` is None (e.g. bottleneck adapters after each attention / MLP
        block of a known architecture); None falls back to the per-architecture default of the targeting rules."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the method name under "method"."""
        out: dict[str, Any] = {"method": self.method}
        for field in dataclasses.fields(self):
            out[field.name] = _jsonable(getattr(self, field.name))
        return out

    def replace(self, **changes: Any) -> "DeltaConfig":
        """A copy with some fields changed (checked like a new config)."""
        check_field_names(type(self), changes)
        return dataclasses.replace(self, **changes)


def field_names(config_cls: type[DeltaConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def check_field_names(config_cls: type[DeltaConfig], given: dict[str, Any]) -> None:
    """Unknown fields are an error that lists the valid ones."""
    valid = field_names(config_cls)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise DeltatuneError(
            f"{config_cls.method}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def check_value(value: Any, hint: Any, where: str) -> Any:
    """Return `value` (normalised: lists for JSON arrays, floats for ints in float fields) or raise."""
    ok, normalised = _match(value, hint)
    if not ok:
        raise DeltatuneError(f"{where} must be {_type_name(hint)}, got {value!r}")
    return normalised


def _match(value: Any, hint: Any) -> tuple[bool, Any]:  # noqa: C901 - one branch per typing construct
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, norm = _match(value, arm)
            if ok:
                return True, norm
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = []
        for v in value:
            ok, norm = _match(v, item)
            if not ok:
                return False, value
            items.append(norm)
        return True, items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_t, val_t = typing.get_args(hint)
        out = {}
        for k, v in value.items():
            ok_k, nk = _match(k, key_t)
            ok_v, nv = _match(v, val_t)
            if not (ok_k and ok_v):
                return False, value
            out[nk] = nv
        return True, out
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if isinstance(hint, type):
        return isinstance(value, hint), value
    raise TypeError(f"config annotation {hint!r} is not supported by deltatune's field checker")
