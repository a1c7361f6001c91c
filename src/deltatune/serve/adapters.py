"""The adapters a server knows: names, where they live, which are loaded, and LRU eviction.

Public names are what clients send as `"model"`. An adapter is *registered* (the server may serve it: given on the
command line, loaded through the management API, or found under the adapter root on first request) and, separately,
*loaded* (its deltas sit on the model). At most `max_loaded` are loaded; loading one more evicts the least recently
used adapter that no running request uses, and an evicted adapter is loaded again from disk when asked for.

Only the engine thread changes the model; the lock only guards the bookkeeping that HTTP handlers read.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import api
from ..core.delta import has_pre_forward
from ..core.errors import DeltatuneError
from ..core.io import load as load_adapter
from ..core.slot import slots_of
from ..methods.factored import FactoredDelta
from ..train.interactive import adapter_dir

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    """A public adapter name: letters, digits, '.', '_', '-' (not first), no '..', at most 128 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise DeltatuneError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..'"
        )
    return name


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refused unless it resolves (symlinks followed) to a directory inside `root`."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or "\\" in relative:
        raise DeltatuneError(f"adapter path {relative!r} must be a relative path inside the adapter root")
    base = root.resolve()
    target = (base / relative).resolve()
    if target == base or not target.is_relative_to(base):
        raise DeltatuneError(f"adapter path {relative!r} leaves the adapter root")
    return target


@dataclass
class AdapterEntry:
    name: str
    directory: Path
    internal: str | None = None  # the name on the model while loaded
    pins: int = 0  # running requests using it
    last_used: float = 0.0
    loads: int = 0


class AdapterStore:
    """Registered and loaded adapters of one served model."""

    def __init__(self, model: nn.Module, root: str | Path | None = None, max_loaded: int = 8,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if max_loaded < 1:
            raise DeltatuneError(f"--max-loaded must be >= 1, got {max_loaded}")
        self.model = model
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise DeltatuneError(f"adapter root {str(self.root)!r} is not a directory")
        self.max_loaded = max_loaded
        self.compute_dtype = compute_dtype
        self.entries: dict[str, AdapterEntry] = {}
        self.lock = threading.Lock()
        self._ids = itertools.count()

    # ---- registration (any thread) --------------------------------------------------------------------------------
    def register(self, name: str, directory: str | Path) -> AdapterEntry:
        """Serve `name` from `directory` (an adapter directory or a training output holding one)."""
        check_name(name)
        found = adapter_dir(directory).resolve()
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None and entry.directory != found:
                raise DeltatuneError(f"adapter {name!r} is already served from another directory; unload it first")
            if entry is None:
                entry = self.entries[name] = AdapterEntry(name, found)
            return entry

    def register_from_root(self, name: str, relative: str | None = None) -> AdapterEntry:
        """Register `name` from `<root>/<relative or name>`; only paths inside the root are accepted."""
        check_name(name)
        if self.root is None:
            raise DeltatuneError("this server has no adapter root (--adapter-root); adapters cannot be loaded by name")
        return self.register(name, inside(self.root, relative or name))

    def get(self, name: str) -> AdapterEntry | None:
        with self.lock:
            return self.entries.get(name)

    def find(self, name: str) -> AdapterEntry | None:
        """The registered adapter `name`, or one found as `<root>/<name>` (registered then), or None."""
        with self.lock:
            entry = self.entries.get(name)
        if entry is not None or self.root is None or not NAME_PATTERN.fullmatch(name) or ".." in name:
            return entry
        try:
            return self.register_from_root(name)
        except DeltatuneError:
            return None

    def listing(self) -> list[dict]:
        with self.lock:
            return [{"name": e.name, "loaded": e.internal is not None, "in_use": e.pins, "loads": e.loads,
                     "last_used": e.last_used or None, "path": self._shown_path(e.directory)}
                    for e in self.entries.values()]

    def _shown_path(self, directory: Path) -> str:
        if self.root is not None and directory.is_relative_to(self.root.resolve()):
            return str(directory.relative_to(self.root.resolve()))
        return str(directory)

    # ---- loading (engine thread only) ---------------------------------------------------------------------------
    def acquire(self, name: str) -> str | None:
        """Pin adapter `name` for a request and return its name on the model, loading it first if needed (and
        evicting the least recently used idle adapter). None: every loaded adapter is in use; try again later."""
        entry = self.find(name)
        if entry is None:
            raise DeltatuneError(f"adapter {name!r} is not served here")
        if entry.internal is None:
            if self._loaded_count() >= self.max_loaded and not self._evict_one():
                return None
            self._load(entry)
        with self.lock:
            entry.pins += 1
            entry.last_used = time.time()
        return entry.internal

    def release(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def load_now(self, name: str) -> AdapterEntry:
        """Load a registered adapter now (management API); evicts like `acquire` but pins nothing."""
        entry = self.entries[name]
        if entry.internal is None:
            if self._loaded_count() >= self.max_loaded and not self._evict_one():
                raise DeltatuneError(f"all {self.max_loaded} loaded adapters are in use; retry later")
            self._load(entry)
        entry.last_used = time.time()
        return entry

    def unload(self, name: str, forget: bool = True) -> None:
        """Take `name` off the model (and, with forget, stop serving it). Refused while requests use it."""
        entry = self.entries.get(name)
        if entry is None:
            raise DeltatuneError(f"adapter {name!r} is not served here")
        if entry.pins:
            raise DeltatuneError(f"adapter {name!r} is in use by {entry.pins} running request(s); retry later")
        self._evict(entry)
        if forget:
            with self.lock:
                del self.entries[name]

    def _loaded_count(self) -> int:
        return sum(e.internal is not None for e in self.entries.values())

    def _evict_one(self) -> bool:
        idle = [e for e in self.entries.values() if e.internal is not None and e.pins == 0]
        if not idle:
            return False
        self._evict(min(idle, key=lambda e: e.last_used))
        return True

    def _evict(self, entry: AdapterEntry) -> None:
        if entry.internal is not None:
            api.delete(self.model, entry.internal)
            with self.lock:
                entry.internal = None

    def _load(self, entry: AdapterEntry) -> None:
        internal = f"served_{next(self._ids)}"  # model-side names never repeat, so no cache sees a stale one
        load_adapter(self.model, entry.directory, name=internal)
        try:
            check_servable(self.model, internal)
            cast_for_serving(self.model, internal, self.compute_dtype)
        except BaseException:
            api.delete(self.model, internal)
            raise
        with self.lock:
            entry.internal = internal
            entry.loads += 1


def check_servable(model: nn.Module, internal: str) -> None:
    """Refuse methods that rewrite their host's inputs (prompt / prefix tuning): they change sequence lengths or
    attention inputs, which the serving KV cache does not model."""
    for path, _, slot in slots_of(model):
        delta = slot._modules.get(internal)
        if delta is not None and has_pre_forward(type(delta)):
            raise DeltatuneError(
                f"adapter method {type(delta).__name__} rewrites the inputs of {path!r}; deltatune serve supports "
                "methods that act on layer outputs (LoRA family, (IA)³, ...)"
            )


def cast_for_serving(model: nn.Module, internal: str, dtype: torch.dtype) -> None:
    """Low-rank factors in the compute dtype (bf16 on CPUs with native bf16). Autocast would round them to bf16
    in every matmul anyway, so this changes no result, but the mixed-batch kernel then updates the layer output in
    place with one rounding (as the single-adapter path does) instead of casting the stacked factors every step.
    Other methods keep their float32 parameters (some invert or orthogonalise them)."""
    if dtype == torch.float32:
        return
    for _, _, slot in slots_of(model):
        delta = slot._modules.get(internal)
        if isinstance(delta, FactoredDelta):
            delta.to(dtype)
