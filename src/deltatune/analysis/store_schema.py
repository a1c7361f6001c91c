"""The adapter store's SQLite schema and the small pure helpers around it (rows to dicts, visibility, names)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import DeltatuneError

SCHEMA_VERSION = 1
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS adapters (
        id TEXT PRIMARY KEY,            -- SHA-256 of (adapter_config.json, weights SHA-256)
        name TEXT UNIQUE NOT NULL,
        kind TEXT NOT NULL,             -- 'adapter' or 'composed'
        base_model TEXT,
        method TEXT NOT NULL,
        description TEXT NOT NULL,
        metrics TEXT NOT NULL,          -- JSON object
        owner TEXT,
        config TEXT NOT NULL,           -- adapter_config.json
        blob TEXT NOT NULL,             -- SHA-256 of the weights: blobs/<aa>/<sha>.safetensors
        bytes INTEGER NOT NULL,
        parameters INTEGER NOT NULL,
        embedding BLOB NOT NULL,        -- float32 description embedding
        created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tags (
        adapter TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        tag TEXT NOT NULL, PRIMARY KEY (adapter, tag))""",
    """CREATE TABLE IF NOT EXISTS access (
        adapter TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        grp TEXT NOT NULL, PRIMARY KEY (adapter, grp))""",
    """CREATE TABLE IF NOT EXISTS derived (      -- composed artefact (child) made from a source (parent)
        child TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        parent TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        weight REAL NOT NULL, PRIMARY KEY (child, parent))""",
    """CREATE TABLE IF NOT EXISTS prototypes (   -- Arrow routing cache: top right-singular vector per module
        adapter TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        path TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (adapter, path))""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS derived_parent ON derived (parent)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]


def entry_from_row(row, tags: list[str], groups: list[str], sources: list[tuple[str, float]],
                   children: list[str]) -> dict:
    """One store entry as plain data."""
    return {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "base_model": row["base_model"],
        "method": row["method"],
        "description": row["description"],
        "tags": tags,
        "groups": groups,
        "owner": row["owner"],
        "metrics": json.loads(row["metrics"]),
        "parameters": row["parameters"],
        "bytes": row["bytes"],
        "blob": row["blob"],
        "created": datetime.datetime.fromtimestamp(row["created"], datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "derived_from": [{"name": n, "weight": w} for n, w in sources],
        "composed_into": children,
    }


def is_visible(entry_groups: Sequence[str], user_groups: Sequence[str] | None) -> bool:
    """None means the store owner's view (everything); otherwise every group of the entry must be public or held."""
    if user_groups is None:
        return True
    return set(entry_groups) - {"public"} <= set(user_groups)


def parse_groups(text: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b']; None stays None (no restriction)."""
    if text is None:
        return None
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        raise DeltatuneError("--groups needs at least one group name, e.g. --groups public,research")
    return groups


def canonical_base(name: str | None) -> str | None:
    """The embedded model's short name when `name` is where deltatune keeps it, else `name` as given."""
    if not name:
        return None
    from ..train.models import EMBEDDED, cache_root

    if name in EMBEDDED:
        return name
    path = Path(name).expanduser()
    for short in EMBEDDED:
        if path.name == short and path.parent.resolve() == cache_root().resolve():
            return short
    if path.name == "model" and path.parent.name.replace("_", "-").endswith("minilm-l6-v2"):
        return "minilm-l6"
    return name
