"""Save and load adapters in PEFT's on-disk layout. The only module that knows PEFT's envelope and key prefix.

A directory holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
`base_model.model.<module path>.<suffix>`, the suffix given by the delta (`lora_A.weight`, ...). The config has
PEFT's fields (`peft_type`, `target_modules` = the exact adapted paths, and the method's own fields) plus a
`deltatune` section holding our own config, so methods PEFT does not know use the same layout with their own
`peft_type`. Writes are atomic; loads never unpickle anything and leave the model unchanged on any error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .. import __version__
from .api import _known, attach_at, delete, detach, set_trainable, shared_of
from .config import DeltaConfig
from .errors import DeltatuneError
from .registry import config_from_dict, list_methods, spec_of
from .slot import Host, get_state, require_state, slots_of
from .targeting import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # adapter-wide tensors sit beside the model, as PEFT's `base_model.vera_A`
FORMAT_VERSION = 1
# PEFT envelope fields that are about the wrapper, not the adapter.
_ENVELOPE = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
             "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
             "modules_to_save", "deltatune"}


# ---- writing ---------------------------------------------------------------------------------------------------------
def atomic_write_files(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write `files` into `directory` so a reader never sees a half-written file.

    A new directory appears all at once (written beside it, then renamed); in an existing one each file is written
    to a temp name, fsynced and renamed over the old one.
    """
    target = check_output_dir(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        staging = staging_dir(target)
        try:
            for name, data in files.items():
                _write_synced(staging / name, data)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
        os.close(fd)
        try:
            _write_synced(Path(tmp), data)
            os.replace(tmp, target / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def staging_dir(target: Path) -> Path:
    """A private temporary directory beside `target`, with the permissions a plain mkdir would give (mkdtemp's
    0700 would otherwise survive the rename)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def check_output_dir(directory: str | os.PathLike) -> Path:
    """A path we can create or write a directory at, or one clear error (checked before any work is done)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise DeltatuneError(f"cannot write to {str(target)!r}: it exists and is not a directory; choose another path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DeltatuneError(f"cannot write to {str(target)!r}: {str(parent)!r} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise DeltatuneError(f"cannot write to {str(target)!r}: {str(parent)!r} is not writable")
            break
    return target


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors `save` writes for one adapter, by file key."""
    out = {}
    for path, module, slot in slots_of(model):
        if name in slot:
            host = Host(module, slot)
            bare = getattr(slot[name], "peft_bare_keys", ())  # PEFT's path-less keys (prompt_embeddings)
            for suffix, tensor in slot[name].state_tensors(host).items():
                key = suffix if suffix in bare else f"{PREFIX}{path}.{suffix}"
                out[key] = tensor.detach().to("cpu").contiguous().clone()
    shared = shared_of(model, name)
    if shared is not None:
        delta_cls = spec_of(require_state(model).adapters[name].config).delta
        for key, tensor in delta_cls.shared_state_tensors(shared).items():
            out[f"{SHARED_PREFIX}{key}"] = tensor.detach().to("cpu").contiguous().clone()
    return out


def adapter_config_json(model: nn.Module, name: str) -> dict[str, Any]:
    state = require_state(model)
    record = state.adapters[name]
    spec = spec_of(record.config)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    data: dict[str, Any] = {
        "peft_type": spec.peft.peft_type if spec.peft else spec.name.upper(),
        "task_type": None,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "target_modules": sorted(record.paths),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }
    if spec.peft:
        data.update(spec.peft.to_peft(record.config))
    else:  # PEFT cannot read it anyway; for PEFT types the section goes in the weights' metadata (PEFT warns here)
        data["deltatune"] = deltatune_section(model, name)
    return data


def deltatune_section(model: nn.Module, name: str) -> dict[str, Any]:
    """Our own record of the adapter: the exact config (targets as the user wrote them) and the adapted paths."""
    record = require_state(model).adapters[name]
    return {"format": FORMAT_VERSION, "version": __version__, "config": record.config.to_dict(),
            "paths": list(record.paths)}


def save(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `directory` (PEFT layout, atomic). Returns the directory."""
    state = require_state(model)
    _known(state, [name])
    metadata = {"format": "pt", "deltatune": json.dumps(deltatune_section(model, name))}
    weights = save_safetensors_bytes(adapter_tensors(model, name), metadata=metadata)
    config = json.dumps(adapter_config_json(model, name), indent=2, sort_keys=True).encode()
    return atomic_write_files(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: config})


# ---- reading ---------------------------------------------------------------------------------------------------------
def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config json, tensors) of an adapter directory, with one clear error for each way it can be broken."""
    src = Path(directory)
    if not src.is_dir():
        raise DeltatuneError(f"adapter directory {str(src)!r} does not exist")
    cfg_path, weights_path = src / CONFIG_NAME, src / WEIGHTS_NAME
    if not cfg_path.is_file():
        inner = sorted(p.name for p in src.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f"; it holds adapters in sub-directories: {', '.join(inner)} — load one of those" if inner else ""
        raise DeltatuneError(f"{str(src)!r} is not an adapter directory: it has no {CONFIG_NAME}{hint}")
    if not weights_path.is_file():
        pickled = (src / "adapter_model.bin").is_file()
        hint = " (it has adapter_model.bin: deltatune never unpickles; convert it to safetensors)" if pickled else ""
        raise DeltatuneError(f"{str(src)!r} has no {WEIGHTS_NAME}{hint}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltatuneError(f"{cfg_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{cfg_path}: expected a JSON object")
    try:
        blob = weights_path.read_bytes()
        tensors = load_safetensors_bytes(blob)
        metadata = _safetensors_metadata(blob)
    except Exception as err:  # safetensors raises its own error types for truncation/corruption
        raise DeltatuneError(f"{weights_path}: not a readable safetensors file ({err}); re-save the adapter") from None
    if "deltatune" not in raw and "deltatune" in metadata:
        try:
            raw = {**raw, "deltatune": json.loads(metadata["deltatune"])}
        except json.JSONDecodeError:
            raise DeltatuneError(f"{weights_path}: corrupted deltatune metadata") from None
    return raw, tensors


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file (header: 8-byte little-endian length, then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__") or {}


def config_from_adapter_json(raw: dict[str, Any], where: str = "") -> DeltaConfig:
    """Our config for an adapter_config.json written by deltatune or by PEFT."""
    ours = raw.get("deltatune")
    if isinstance(ours, dict) and isinstance(ours.get("config"), dict):
        return config_from_dict(ours["config"])
    peft_type = raw.get("peft_type")
    candidates = [s for s in list_methods().values() if s.peft and s.peft.peft_type == peft_type]
    chosen = [s for s in candidates if s.peft.claims(raw)]
    if not chosen:
        known = sorted({s.peft.peft_type for s in list_methods().values() if s.peft})
        raise DeltatuneError(f"{where}: PEFT type {peft_type!r} is not supported; deltatune reads: {', '.join(known)}")
    spec = chosen[0]
    if raw.get("modules_to_save"):
        raise DeltatuneError(f"{where}: modules_to_save={raw['modules_to_save']} is not supported yet")
    method_fields = {k: v for k, v in raw.items() if k not in _ENVELOPE}
    kwargs = spec.peft.from_peft(method_fields)
    kwargs.update(targets=raw.get("target_modules"), exclude=raw.get("exclude_modules"))
    kwargs.update(layers=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"))
    return spec.config(**kwargs)


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in `directory` (by deltatune or PEFT) as `name` (default "default"); it becomes
    active. Its parameters train only with trainable=True. On any error the model is left as it was."""
    name = name or "default"
    state = get_state(model)
    if state is not None and name in state.adapters:
        raise DeltatuneError(f"an adapter named {name!r} is already attached; pass name=... to load under another name")
    raw, tensors = read_adapter_dir(directory)
    config = config_from_adapter_json(raw, str(directory))
    spec = spec_of(config)
    where = str(directory)
    tensors = _place_bare_keys(model, tensors, config, spec, raw, where)
    by_path, unplaced = _group_by_module(model, tensors, spec, where)
    paths = (raw.get("deltatune") or {}).get("paths") or sorted(by_path)
    _check_paths(model, paths, spec, where)
    routing = (state.active, state.rows) if state is not None else None
    attach_at(model, config, paths, name)
    try:
        _fill_shared(model, name, spec, unplaced, where)
        _fill(model, name, by_path, where)
    except BaseException:
        delete(model, name)
        if routing is None:
            detach(model)  # the state was created by this load: leave no trace
        else:
            state.active, state.rows = routing
        raise
    if not trainable:
        set_trainable(model, name, False)
    return model


def _place_bare_keys(model: nn.Module, tensors: dict[str, torch.Tensor], config: DeltaConfig, spec,
                     raw: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """PEFT writes a prompt-learning adapter's tensor with no module path (`prompt_embeddings`): key such tensors
    under the one module the method sits on (the recorded path, else where the config places it)."""
    bare = set(getattr(spec.delta, "peft_bare_keys", ())) & set(tensors)
    if not bare:
        return tensors
    paths = (raw.get("deltatune") or {}).get("paths") or find_targets(model, config, spec.accepts,
                                                                      ", ".join(spec.hosts))
    if len(paths) != 1:
        raise DeltatuneError(f"{where}: tensor {sorted(bare)[0]!r} names no module and {spec.name} sits on "
                             f"{len(paths)} modules ({_few(paths)}); save it with deltatune to record the module")
    return {(f"{PREFIX}{paths[0]}.{k}" if k in bare else k): v for k, v in tensors.items()}


def _check_paths(model: nn.Module, paths: list[str], spec, where: str) -> None:
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise DeltatuneError(f"{where}: the adapter targets modules missing from this model: {_few(missing)}")
    wrong = [p for p in paths if not spec.accepts(modules[p])]
    if wrong:
        raise DeltatuneError(f"{where}: {spec.name} cannot sit on {wrong[0]!r} ({type(modules[wrong[0]]).__name__})")


def _few(items: list[str]) -> str:
    items = sorted(items)
    return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


def _group_by_module(model: nn.Module, tensors: dict[str, torch.Tensor], spec, where: str):
    """Split file keys into ({module path: {suffix: tensor}}, {key: tensor} placed on no module)."""
    modules = dict(model.named_modules())
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    unplaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(SHARED_PREFIX):
            raise DeltatuneError(f"{where}: tensor {key!r} does not start with {PREFIX!r}; not an adapter file")
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else ""
        parts = rest.split(".")
        path = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                     if ".".join(parts[:i]) in modules and spec.accepts(modules[".".join(parts[:i])])), None)
        if path is None:
            unplaced[key[len(SHARED_PREFIX):]] = tensor  # relative to base_model., like shared_state_tensors keys
        else:
            by_path.setdefault(path, {})[rest[len(path) + 1:]] = tensor
    if not by_path and not unplaced:
        raise DeltatuneError(f"{where}: the adapter file holds no tensors")
    return by_path, unplaced


def _fill_shared(model: nn.Module, name: str, spec, unplaced: dict[str, torch.Tensor], where: str) -> None:
    """Adapter-wide tensors; any other key that names no module of this model is a missing target."""
    shared = shared_of(model, name)
    expected = spec.delta.shared_state_tensors(shared) if shared is not None else {}
    leftover = set(unplaced) - set(expected)
    if leftover:
        guesses = {".".join(k.split(".")[:-2] if k.endswith((".weight", ".bias")) else k.split(".")[:-1])
                   for k in (k.removeprefix("model.") for k in leftover)}
        raise DeltatuneError(f"{where}: the adapter targets modules missing from this model: {_few(list(guesses))}")
    if shared is None:
        return
    for key, ref in expected.items():
        if key not in unplaced:
            raise DeltatuneError(f"{where}: missing tensor {SHARED_PREFIX}{key}")
        if tuple(unplaced[key].shape) != tuple(ref.shape):
            raise DeltatuneError(f"{where}: tensor {SHARED_PREFIX}{key} has shape {tuple(unplaced[key].shape)} but the "
                                 f"model needs {tuple(ref.shape)}")
    spec.delta.load_shared_state_tensors(
        shared, {k: unplaced[k].to(device=ref.device, dtype=ref.dtype) for k, ref in expected.items()})


def _fill(model: nn.Module, name: str, by_path: dict[str, dict], where: str) -> None:
    modules = dict(model.named_modules())
    for path, given in by_path.items():
        module = modules[path]
        slot = module.deltatune
        host = Host(module, slot)
        delta = slot[name]
        expected = delta.state_tensors(host)
        for suffix, tensor in list(given.items()):
            if suffix in expected:
                continue
            if suffix in delta.peft_layer_copies:
                del given[suffix]  # PEFT's per-layer copy of an adapter-wide tensor, loaded once from the shared key
                continue
            if suffix.startswith("base_layer.") and _same_as_base(module, suffix, tensor):
                del given[suffix]  # PEFT saves embedding base weights alongside; they must match ours
                continue
            raise DeltatuneError(f"{where}: unexpected tensor {PREFIX}{path}.{suffix} for {delta.config.method}")
        for suffix, ref in expected.items():
            if suffix not in given:
                raise DeltatuneError(f"{where}: missing tensor {PREFIX}{path}.{suffix}")
            if tuple(given[suffix].shape) != tuple(ref.shape):
                raise DeltatuneError(
                    f"{where}: tensor {PREFIX}{path}.{suffix} has shape {tuple(given[suffix].shape)} but the model "
                    f"needs {tuple(ref.shape)}; the adapter was made for another model or rank"
                )
        cast = {k: v.to(device=expected[k].device, dtype=expected[k].dtype) for k, v in given.items()}
        delta.load_state_tensors(cast, host)


def _same_as_base(module: nn.Module, suffix: str, tensor: torch.Tensor) -> bool:
    own = getattr(module, suffix.split(".", 1)[1], None)
    if not isinstance(own, torch.Tensor) or own.shape != tensor.shape:
        return False
    if torch.allclose(own.detach().float().cpu(), tensor.float(), atol=1e-6):
        return True
    raise DeltatuneError(
        f"adapter carries a modified base tensor {suffix!r} for this module (e.g. a resized or trained embedding); "
        "deltatune does not overwrite base weights"
    )


COMPOSITION_NAME = "composition.json"


def save_composition(model: nn.Module, directory: str | os.PathLike, block) -> Path:
    """Save a composition tree and every adapter it names (each in its own sub-directory) together."""
    from .compose import Block

    if not isinstance(block, Block):
        raise DeltatuneError("save_composition needs a composition block (Stack, Average, ...)")
    state = require_state(model)
    names = list(dict.fromkeys(block.names()))
    _known(state, names)
    files = {COMPOSITION_NAME: json.dumps({"composition": block.to_dict(), "adapters": names}, indent=2).encode()}
    target = atomic_write_files(directory, files)
    for name in names:
        save(model, target / name, name=name)
    return target


def load_composition(model: nn.Module, directory: str | os.PathLike):
    """Load every adapter of a saved composition (under its own name) and return the composition tree."""
    from .compose import block_from_dict

    path = Path(directory) / COMPOSITION_NAME
    if not path.is_file():
        raise DeltatuneError(f"{str(directory)!r} holds no {COMPOSITION_NAME}; was it written by save_composition?")
    try:
        data = json.loads(path.read_text())
        block = block_from_dict(data["composition"])
        names = list(data["adapters"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DeltatuneError(f"{path}: not a valid composition file ({err})") from None
    loaded = []
    try:
        for name in names:
            load(model, Path(directory) / name, name=name)
            loaded.append(name)
    except BaseException:
        for name in loaded:
            delete(model, name)
        raise
    return block
