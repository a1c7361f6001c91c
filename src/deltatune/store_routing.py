"""Routing over the adapter store for `deltatune serve --store DIR`.

The server (serve) and the store (analysis) are sibling packages that never import each other; this top-level glue,
handed to `serve.commands.add_commands` by cli.py, builds the server's resolver from the store: a request's text
picks the top-k adapters visible to the server's access groups by description similarity, their weighted sum is
stored once as an exact LoRA (`analysis.routing.composed_for_input`, cached in the store under `routed-<hash>`),
exported to a per-server directory, and served like any other adapter.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module to build its parser; torch loads only when serving
    from torch import nn


def store_resolver(store_dir: str | Path, groups: Sequence[str], base: str, top_k: int, model: nn.Module, *,
                   embedder=None, export_dir: str | Path | None = None) -> Callable[[str, str], tuple[str, Path]]:
    """A serve resolver over the store at `store_dir`. Call it where `model` is not running (the engine thread):
    on a cache miss it attaches the chosen adapters for the composition and removes them again.

    `export_dir`: where composed adapters are written for the server (default: a temporary directory removed at
    exit). `embedder`: the store's text embedder (default MiniLM)."""
    from .analysis.routing import composed_for_input
    from .analysis.store import AdapterStore

    AdapterStore(store_dir, embedder=embedder).close()  # no store there: fail at start-up, not on a request
    if export_dir is None:
        export_dir = tempfile.mkdtemp(prefix="deltatune-routed-")
        atexit.register(shutil.rmtree, export_dir, ignore_errors=True)
    exports = Path(export_dir)
    groups = list(groups)
    opened = threading.local()  # SQLite connections belong to the thread that opened them

    def resolve(model_name: str, text: str) -> tuple[str, Path]:
        store = getattr(opened, "store", None)
        if store is None:
            store = opened.store = AdapterStore(store_dir, embedder=embedder)
        entry = composed_for_input(store, model, text, groups=groups, base_model=base, top_k=top_k)
        directory = exports / entry["name"]  # content-named: one export per composition
        if not directory.is_dir():
            store.export(entry["name"], directory, groups)
        return entry["name"], directory

    return resolve
