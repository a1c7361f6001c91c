"""ΔW per module, read through the contract: from an adapter directory (any mergeable method, via
`Delta.delta_weight(host)`) or from a fully fine-tuned model directory (ΔW = W_ft − W_base).

Both give a `DeltaSet`: the adapted module paths and, per path, a `LayerDelta` computed on demand (one layer at a
time, so a 135M-parameter model never holds all its updates at once). Matrices are in the host's matrix view
(out_features × fan_in) as float32 on CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core import api
from ..core.errors import DeltatuneError
from ..core.hosts import WEIGHT_KINDS, host_info, host_kind, read_base_weight, to_matrix
from ..core.io import CONFIG_NAME, PREFIX, config_from_adapter_json, load, read_adapter_dir
from ..core.registry import spec_of
from ..core.slot import Host, slots_of

_names = itertools.count()


@dataclass
class LayerDelta:
    """One module's update: ΔW and the base weight W₀ (matrix view), and Δb where the update has one."""

    path: str
    kind: str
    delta: torch.Tensor
    base: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class DeltaSet:
    """The updates of one adapter or fine-tuned model against one base model."""

    label: str
    source: str  # "adapter" or "finetuned"
    paths: list[str]
    get: object  # path -> LayerDelta
    info: dict = field(default_factory=dict)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_adapter_dir(path)


def adapter_summary(directory: str | Path) -> dict:
    """What the adapter file says about itself, without any model: method, config, targets, parameter counts."""
    raw, tensors = read_adapter_dir(directory)
    config = config_from_adapter_json(raw, str(directory))
    section = raw.get("deltatune") or {}
    targets = list(section.get("paths") or raw.get("target_modules") or [])
    per_module = {path: 0 for path in targets}
    wide = 0
    for key, tensor in tensors.items():
        path = _owning_path(key, per_module)
        if path is None:
            wide += tensor.numel()
        else:
            per_module[path] += tensor.numel()
    weights = Path(directory) / "adapter_model.safetensors"
    return {
        "adapter": str(directory),
        "method": config.method,
        "mergeable": spec_of(config).mergeable,
        "config": config.to_dict(),
        "peft_type": raw.get("peft_type"),
        "base_model": raw.get("base_model_name_or_path"),
        "targets": sorted(targets),
        "parameters": {"total": sum(t.numel() for t in tensors.values()), "adapter_wide": wide,
                       "per_module": per_module},
        "file_bytes": weights.stat().st_size,
    }


def _owning_path(key: str, paths: dict[str, int]) -> str | None:
    """The longest target path that `base_model.model.<path>.` prefixes `key`."""
    rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
    if rest is None:
        return None
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in paths:
            return candidate
    return None


def base_model_name(base: str | None, directory: str | Path) -> str:
    """The base model to analyse against: the one given, else the adapter's base_model_name_or_path."""
    if base:
        return base
    recorded = None
    if is_adapter_dir(directory):
        try:
            recorded = json.loads((Path(directory) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = None
    if not recorded:
        raise DeltatuneError(f"{str(directory)!r} does not record its base model; pass --base MODEL "
                             "(smollm2-135m, minilm-l6 or a model directory)")
    return recorded


def load_base_model(name: str) -> nn.Module:
    """A base model by name (embedded or a local directory), in float32 eval mode."""
    from ..train.models import load_model

    return load_model(name)[0]


@contextlib.contextmanager
def attached(model: nn.Module, directory: str | Path, name: str | None = None) -> Iterator[str]:
    """Load the adapter in `directory` onto `model` for the duration of the block (inactive), then remove it."""
    name = name or f"analysis_{next(_names)}"
    fresh = not api.adapters(model)
    active = api.active(model)
    load(model, directory, name=name)
    try:
        api.use(model, [n for n in active if n in api.adapters(model)])
        yield name
    finally:
        api.delete(model, name)
        if fresh and not api.adapters(model):
            api.detach(model)


def loaded_delta_set(model: nn.Module, name: str, label: str) -> DeltaSet:
    """ΔW per module of adapter `name`, already attached to `model`."""
    spec = spec_of(api.adapters(model)[name])
    if not spec.mergeable:
        raise DeltatuneError(f"{label}: {spec.name} acts on activations, so it has no ΔW to analyse")
    hosts = {path: (module, slot) for path, module, slot in slots_of(model) if name in slot}

    def get(path: str) -> LayerDelta:
        module, slot = hosts[path]
        host = Host(module, slot)
        delta = slot[name]
        with torch.no_grad():
            update = delta.delta_weight(host)
            bias = delta.delta_bias(host)
            base = host.weight()
        info = slot.info
        return LayerDelta(path, info.kind, to_matrix(info, update.detach()).float().cpu(),
                          to_matrix(info, base.detach()).float().cpu(),
                          None if bias is None else bias.detach().float().cpu())

    return DeltaSet(label, "adapter", sorted(hosts), get)


@contextlib.contextmanager
def open_deltas(model: nn.Module, source: str | Path) -> Iterator[DeltaSet]:
    """The DeltaSet of an adapter directory or of a fine-tuned model directory, against `model`."""
    source = Path(source)
    if is_adapter_dir(source):
        with attached(model, source) as name:
            yield loaded_delta_set(model, name, str(source))
    elif is_model_dir(source):
        yield finetuned_delta_set(model, source)
    else:
        raise DeltatuneError(f"{str(source)!r} is neither an adapter directory ({CONFIG_NAME}) nor a model "
                             "directory (config.json + *.safetensors)")


def finetuned_delta_set(model: nn.Module, directory: str | Path) -> DeltaSet:
    """ΔW = W_ft − W_base for every weight module of `model` whose weight the fine-tuned safetensors hold."""
    directory = Path(directory)
    where = _safetensors_index(directory)
    modules = {p: m for p, m in model.named_modules() if host_kind(m) in WEIGHT_KINDS}
    paths = sorted(p for p in modules if f"{p}.weight" in where)
    if not paths:
        sample = ", ".join(sorted(where)[:3])
        raise DeltatuneError(f"{str(directory)!r}: none of its tensors ({sample}, ...) names a weight of the base "
                             "model; was it fine-tuned from this base (same model class)?")

    def get(path: str) -> LayerDelta:
        module = modules[path]
        info = host_info(module, path)
        base = read_base_weight(module).detach()
        with safe_open(where[f"{path}.weight"], framework="pt") as handle:
            tuned = handle.get_tensor(f"{path}.weight")
        if tuple(tuned.shape) != tuple(base.shape):
            raise DeltatuneError(f"{str(directory)!r}: {path}.weight has shape {tuple(tuned.shape)} but the base "
                                 f"model's is {tuple(base.shape)}; it was fine-tuned from another model")
        base_m = to_matrix(info, base).float().cpu()
        return LayerDelta(path, info.kind, to_matrix(info, tuned).float() - base_m, base_m)

    return DeltaSet(str(directory), "finetuned", paths, get)


def _safetensors_index(directory: Path) -> dict[str, Path]:
    """tensor key -> file, over every *.safetensors file of a model directory (no pickle is ever read)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (it has {pickled[0]}: deltatune never unpickles; re-save with safetensors)" if pickled else ""
        raise DeltatuneError(f"model directory {str(directory)!r} has no *.safetensors weights{hint}")
    index = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                index.update({key: path for key in handle.keys()})
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise DeltatuneError(f"{path}: not a readable safetensors file ({err})") from None
    return index
