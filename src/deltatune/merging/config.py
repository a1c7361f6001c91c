"""The merge YAML (mergekit's layout): which models, which method, which parameters for which tensors.

    merge_method: ties
    base_model: path/to/base            # a transformers directory or an embedded model name (smollm2-135m)
    models:
      - model: path/to/math
        parameters: {weight: 1.0, density: [1.0, 0.5]}      # a list of numbers is a gradient over the layers
      - model: path/to/code
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 0.3}]  # first filter that is a substring of the name wins
    parameters: {normalize: true}                          # for every model (per-model values override)
    dtype: float32                                         # compute dtype (default: each tensor's own)
    out_dtype: bfloat16                                    # written dtype (default: dtype, else the input's)
    tokenizer_source: base                                 # base (default), or a model path
    output: merged/                                        # or --out on the command line

Instead of `models`, `slices` stacks layer ranges (frankenmerges), each slice merging its sources:

    slices:
      - sources: [{model: a, layer_range: [0, 16]}]
      - sources: [{model: b, layer_range: [8, 24]}, {model: c, layer_range: [8, 24]}]
        parameters: {t: 0.5}

fisher / regmean read per-model statistics (`deltatune.merging.statistics`): `models: [{model: a, statistics:
a_fisher.safetensors}, ...]`.

Precedence of parameters: slice source, slice, model, global. Gradients interpolate over the layer's position in
its stack (t = layer / (layers − 1)); tensors outside the layer stack see t = 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import DeltatuneError

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "output", "shard_size", "allow_crimes"}
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


@dataclass(frozen=True)
class Source:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None
    statistics: str | None = None  # per-tensor statistics (Fisher, Gram matrices) for fisher / regmean


@dataclass(frozen=True)
class Slice:
    sources: list[Source]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    base_model: str | None = None
    models: list[Source] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    output: str | None = None
    shard_size: int = 2 << 30
    allow_crimes: bool = False
    where: str = "merge config"

    def all_models(self) -> list[str]:
        """Every model the config names (base first), without repeats."""
        names = [self.base_model] if self.base_model else []
        for src in self.models or [s for sl in self.slices or [] for s in sl.sources]:
            names.append(src.model)
        return list(dict.fromkeys(names))


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    file = Path(path)
    if not file.is_file():
        raise DeltatuneError(f"merge config {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise DeltatuneError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_merge_config(raw, str(file), relative_to=file.parent)


def parse_merge_config(raw: Any, where: str = "merge config", relative_to: Path | None = None) -> MergeConfig:
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{where}: expected a mapping with merge_method and models (or slices)")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise DeltatuneError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise DeltatuneError(f"{where}: merge_method must name a merge method (e.g. ties, linear, slerp)")
    if (raw.get("models") is None) == (raw.get("slices") is None):
        raise DeltatuneError(f"{where}: give exactly one of 'models' and 'slices'")
    resolve = _path_resolver(relative_to)
    base = raw.get("base_model")
    models = slices = None
    if raw.get("models") is not None:
        models = [_source(m, f"{where}: models[{i}]", resolve, False) for i, m in enumerate(_list(raw, "models", where))]
    else:
        slices = [_slice(s, f"{where}: slices[{i}]", resolve) for i, s in enumerate(_list(raw, "slices", where))]
    return MergeConfig(
        merge_method=method, base_model=resolve(_str(base, f"{where}: base_model")) if base is not None else None,
        models=models, slices=slices, parameters=_params(raw.get("parameters"), f"{where}: parameters"),
        dtype=_dtype(raw.get("dtype"), f"{where}: dtype"), out_dtype=_dtype(raw.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=_tokenizer(raw.get("tokenizer_source"), resolve, where), output=raw.get("output"),
        shard_size=parse_size(raw.get("shard_size", 2 << 30), f"{where}: shard_size"),
        allow_crimes=bool(raw.get("allow_crimes", False)), where=where)


def _path_resolver(relative_to: Path | None):
    """Model references: relative paths are relative to the YAML file; other names are kept (embedded models)."""

    def resolve(ref: str) -> str:
        if relative_to is not None and not os.path.isabs(ref) and (relative_to / ref).exists():
            return str(relative_to / ref)
        return ref

    return resolve


def _list(raw: dict, key: str, where: str) -> list:
    value = raw[key]
    if not isinstance(value, list) or not value:
        raise DeltatuneError(f"{where}: {key} must be a non-empty list")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DeltatuneError(f"{where} must be a model path or name, got {value!r}")
    return value


def _source(raw: Any, where: str, resolve, in_slice: bool) -> Source:
    if isinstance(raw, str) and not in_slice:
        return Source(resolve(raw))
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{where}: expected a mapping with 'model'")
    valid = {"model", "parameters", "layer_range"} if in_slice else {"model", "parameters", "statistics"}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise DeltatuneError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    layer_range = None
    if in_slice:
        span = raw.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1]):
            raise DeltatuneError(f"{where}: layer_range must be [start, end) with 0 <= start < end, got {span!r}")
        layer_range = (span[0], span[1])
    stats = raw.get("statistics")
    return Source(resolve(_str(raw.get("model"), f"{where}: model")), _params(raw.get("parameters"), where),
                  layer_range, resolve(_str(stats, f"{where}: statistics")) if stats is not None else None)


def _slice(raw: Any, where: str, resolve) -> Slice:
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise DeltatuneError(f"{where}: a slice needs a non-empty 'sources' list")
    unknown = sorted(set(raw) - {"sources", "parameters"})
    if unknown:
        raise DeltatuneError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: parameters, sources")
    sources = [_source(s, f"{where}.sources[{i}]", resolve, True) for i, s in enumerate(raw["sources"])]
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise DeltatuneError(f"{where}: every source of a slice must span the same number of layers, got "
                             f"{sorted(lengths)}")
    return Slice(sources, _params(raw.get("parameters"), where))


def _params(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{where}: parameters must be a mapping of name -> value")
    for name, value in raw.items():
        _check_setting(value, f"{where}.{name}")
    return dict(raw)


def _check_setting(value: Any, where: str) -> None:
    scalar = (bool, int, float, str)
    if value is None or isinstance(value, scalar):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, scalar) for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for cond in value:
            if "value" not in cond or set(cond) - {"filter", "value"}:
                raise DeltatuneError(f"{where}: each conditional entry needs 'value' (and optionally 'filter'), "
                                     f"got {cond!r}")
            _check_setting(cond["value"], where)
        return
    raise DeltatuneError(f"{where}: a value, a list of numbers (gradient) or a list of {{filter, value}} entries, "
                         f"got {value!r}")


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPE_NAMES:
        raise DeltatuneError(f"{where} must be one of {', '.join(sorted(DTYPE_NAMES))}, got {value!r}")
    return DTYPE_NAMES[value]


def _tokenizer(value: Any, resolve, where: str) -> str | None:
    if value is None or value == "base":
        return None
    return resolve(_str(value, f"{where}: tokenizer_source"))


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string like '500MB' / '2GB'."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B")
        for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
            if text.endswith(suffix):
                try:
                    return int(float(text[:-1]) * factor)
                except ValueError:
                    break
        if text.isdigit() and int(text) > 0:
            return int(text)
    raise DeltatuneError(f"{where} must be a size in bytes or like '500MB', got {value!r}")


def evaluate_setting(value: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: filters pick by name substring, number lists interpolate at t ∈ [0, 1].

    Returns None when no conditional entry matches (the next scope is tried)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            pattern = cond.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numeric:
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    result = (1 - frac) * value[i0] + frac * value[i1]
    return int(result) if all(isinstance(v, int) for v in value) and frac == 0 else result


def lookup(name: str, scopes: list[dict[str, Any]], tensor_name: str, t: float) -> Any:
    """The first scope (highest precedence first) that sets `name` for this tensor, else None."""
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
