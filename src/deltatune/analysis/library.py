"""The store meets a model: attach stored adapters for a while, and store weighted compositions of them."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from ..core import api
from ..core.errors import DeltatuneError
from ..core.io import load
from .compose import compose_lora
from .store import AdapterStore


@contextlib.contextmanager
def loaded(store: AdapterStore, model: nn.Module, entries: list[dict],
           groups: Sequence[str] | None) -> Iterator[list[str]]:
    """Attach store entries to `model` (as route0, route1, ...) for the block; the model is left as it was."""
    fresh = not api.adapters(model)
    names = []
    try:
        for i, entry in enumerate(entries):
            with store.exported(entry["name"], groups) as directory:  # visibility is checked again here
                load(model, directory, name=f"route{i}")
            names.append(f"route{i}")
        yield names
    finally:
        for name in names:
            api.delete(model, name)
        if fresh and not api.adapters(model):
            api.detach(model)


def compose_into_store(store: AdapterStore, model: nn.Module, refs: Sequence[str], weights: Sequence[float], *,
                       name: str, description: str = "", groups: Sequence[str] | None = None,
                       max_rank: int | None = None, tags: Sequence[str] = ()) -> dict:
    """Store Σᵢ wᵢ·ΔWᵢ of stored adapters as a composed LoRA artefact (removed with any of its sources)."""
    if len(refs) < 1 or len(refs) != len(weights):
        raise DeltatuneError(f"compose needs one weight per adapter; got {len(refs)} adapters, {len(weights)} weights")
    entries = [store.show(ref, groups) for ref in refs]
    bases = {e["base_model"] for e in entries}
    if len(bases) != 1:
        raise DeltatuneError(f"cannot compose adapters of different base models: {sorted(map(str, bases))}")
    with loaded(store, model, entries, groups) as names, tempfile.TemporaryDirectory() as tmp:
        built = compose_lora(model, names, weights, Path(tmp) / "composed", max_rank=max_rank)
        entry = store.add(Path(tmp) / "composed", name=name, description=description, base_model=bases.pop(),
                          tags=tags, derived_from=[(e["id"], w) for e, w in zip(entries, weights)],
                          metrics={"compose_rank": built["rank"], "compose_relative_error": built["relative_error"]})
    return {**entry, "rank": built["rank"], "relative_error": built["relative_error"]}
