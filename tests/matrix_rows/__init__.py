"""Rows of the generic test matrix, one module per method family (each defines ROWS).

A row is (row id, method name, config fields). The row id names the key snapshot in tests/snapshots/keys/.
A family module imports its method module so the method is registered even before methods/__init__ lists it.
"""

from __future__ import annotations

import importlib
import pkgutil


def collect_rows() -> list[tuple[str, str, dict]]:
    rows = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        rows.extend(importlib.import_module(f"{__name__}.{info.name}").ROWS)
    ids = [r[0] for r in rows]
    duplicated = {i for i in ids if ids.count(i) > 1}
    assert not duplicated, f"matrix row ids must be unique: {sorted(duplicated)}"
    return rows
