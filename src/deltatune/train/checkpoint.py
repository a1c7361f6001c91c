"""Checkpoints that survive SIGKILL at any moment, hold everything an exact resume needs, and never pickle.

A checkpoint is a directory `checkpoints/step-NNNNNN/` with the adapter(s) in PEFT layout, `trainer_state.json`
(step, data position, Python RNG, optimizer hyper-parameters) and `trainer_state.safetensors` (optimizer moments,
torch RNG). It is written under a temporary name, every file fsynced, then renamed: a directory named `step-*` is
always complete. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import DeltatuneError
from ..core.io import staging_dir
from ..core.io import save as save_adapter

PREFIX = "step-"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor (FSDP keeps optimizer state as sharded DTensors: gathering is a collective)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON metadata) of the optimizer state. Under FSDP every rank must call it."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = _full(value).detach().cpu().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():  # under FSDP, shard each full tensor like its parameter
        for name, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0:
                entry[name] = _like(params[index], value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def save_checkpoint(root: Path, step: int, model: nn.Module, adapters: list[str], optimizer_state: tuple,
                    position: dict, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically under root/checkpoints and prune old ones.

    `optimizer_state` is `optimizer_payload(optimizer)` (gathered by every rank beforehand when distributed)."""
    folder = root / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    staging = staging_dir(final)
    try:
        for name in adapters:
            save_adapter(model, staging / name, name=name)
        tensors, meta = optimizer_state
        tensors = {**tensors, "rng.torch": torch.get_rng_state()}
        save_file(tensors, staging / "trainer_state.safetensors")
        python_rng = random.getstate()
        state = {"step": step, "position": position, "optimizer": meta, "adapters": adapters,
                 "rng_python": [python_rng[0], list(python_rng[1]), python_rng[2]], **extra}
        (staging / "trainer_state.json").write_text(json.dumps(state))
        _fsync_tree(staging)
        if final.exists():  # a previous run died after renaming but before pruning: replace it
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (leftover temporary directories are ignored)."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def clean_staging(root: Path) -> None:
    """Remove temporary directories left by a run killed mid-write."""
    folder = Path(root) / "checkpoints"
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(f".{PREFIX}"):
                shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(path / "trainer_state.safetensors")
    except Exception as err:
        raise DeltatuneError(f"checkpoint {path} is unreadable ({err}); delete it to resume from an older one") from None
    return state, tensors


def restore_rng(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["rng.torch"])
