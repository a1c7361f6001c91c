"""A local store of adapters: SQLite for the metadata, content-addressed safetensors blobs on disk.

Layout of a store directory:
    store.sqlite                      adapters, tags, access groups, provenance of composed artefacts, caches
    blobs/<aa>/<sha256>.safetensors   the adapter weights, named by the SHA-256 of their bytes

Every write is one SQLite transaction taken with BEGIN IMMEDIATE (one writer at a time; readers are never blocked,
WAL journal). A blob is written (temp name, fsync, rename) inside that transaction, so when a process dies mid-add
SQLite rolls the rows back and the blob is left unreferenced; every later write transaction, and opening the
store, deletes unreferenced blobs and temp files first. Blob writes happen only under the write lock, so this
clean-up can never race with another process's add. Removal deletes rows first (cascading to composed artefacts
derived from the adapter), commits, then unlinks the blobs no row references any more.

Access control: every entry has one or more access groups; `public` is visible to everyone. A query made with a
user's groups sees an entry only if every group of the entry is `public` or one of the user's. A composed artefact
carries the union of its sources' groups, so it is visible only to users who may see all of its sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from ..core.errors import DeltatuneError
from ..core.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_files,
    config_from_adapter_json,
    read_adapter_dir,
)
from .store_schema import SCHEMA, canonical_base, entry_from_row, is_visible

PUBLIC = "public"
DB_NAME = "store.sqlite"


def _inside_add_transaction() -> None:
    """Test hook: called inside the add transaction after the blob is written, before COMMIT."""


def default_store_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_STORE") or Path.home() / ".deltatune" / "store")


class AdapterStore:
    """Open (create=True: create) the store at `root`. `embedder`: list[str] -> unit-row Tensor, default MiniLM."""

    def __init__(self, root: str | os.PathLike, *, create: bool = False, embedder=None) -> None:
        self.root = Path(root)
        self._embedder = embedder
        db = self.root / DB_NAME
        if not db.is_file():
            self._prepare_new(create)
        try:
            self._con = sqlite3.connect(db, timeout=30.0, isolation_level=None)
            self._con.row_factory = sqlite3.Row
            self._con.execute("PRAGMA foreign_keys = ON")
            self._con.execute("PRAGMA journal_mode = WAL")
            self._con.execute("PRAGMA synchronous = FULL")
            if self._con.execute("PRAGMA user_version").fetchone()[0] == 0:
                with self._write(collect=False) as con:
                    for statement in SCHEMA:
                        con.execute(statement)
        except sqlite3.DatabaseError as err:
            raise DeltatuneError(f"{db}: not a readable deltatune store ({err})") from None
        self._recover()

    def _recover(self) -> None:
        """Collect what a crashed writer left, unless another process is writing right now (then its next
        write transaction, or ours, does it)."""
        self._con.execute("PRAGMA busy_timeout = 0")
        try:
            with self._write():
                pass
        except sqlite3.OperationalError:
            pass  # locked by a live writer, or a read-only store
        finally:
            self._con.execute("PRAGMA busy_timeout = 30000")

    def _prepare_new(self, create: bool) -> None:
        if not create:
            raise DeltatuneError(f"no adapter store at {str(self.root)!r}; `deltatune store add` creates one "
                                 "(or set --store / DELTATUNE_STORE)")
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise DeltatuneError(f"{str(self.root)!r} exists and is not an adapter store; choose an empty or new "
                                 "directory for --store")
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transactions and blobs ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self, collect: bool = True) -> Iterator[sqlite3.Connection]:
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            if collect:
                self._collect_orphans()
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / f"{sha}.safetensors"

    def _collect_orphans(self) -> list[Path]:
        """Delete temp files and blobs no row references (left by a crash). Runs under the write lock."""
        blobs = self.root / "blobs"
        if not blobs.is_dir():
            return []
        referenced = {row[0] for row in self._con.execute("SELECT blob FROM adapters")}
        removed = []
        for path in list(blobs.rglob("*")):
            if path.is_file() and (path.name.startswith(".tmp") or path.stem not in referenced):
                _unlink_blob(path)
                removed.append(path)
        return removed

    def _write_blob(self, sha: str, data: bytes) -> Path:
        target = self.blob_path(sha)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    def blob_bytes(self, entry: dict) -> bytes:
        """The weights of an entry, checked against their content address."""
        data = self.blob_path(entry["blob"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["blob"]:
            raise DeltatuneError(f"store blob of {entry['name']!r} is corrupted (SHA-256 mismatch); remove and "
                                 "re-add the adapter")
        return data

    # ---- embeddings ---------------------------------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            from .embed import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        name = getattr(self.embedder, "name", type(self.embedder).__name__)
        row = self._con.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
        if row is not None and row[0] != name:
            raise DeltatuneError(f"this store's embeddings come from {row[0]!r}, not {name!r}; open it with the "
                                 "same embedder")
        return self.embedder(list(texts)).float()

    # ---- add ----------------------------------------------------------------------------------------------------
    def add(self, directory: str | os.PathLike, *, name: str | None = None, description: str = "",
            tags: Sequence[str] = (), metrics: dict | None = None, owner: str | None = None,
            group: str = PUBLIC, base_model: str | None = None,
            derived_from: Sequence[tuple[str, float]] = ()) -> dict:
        """Store the adapter in `directory` with its metadata; returns the new entry.

        `derived_from` (ref, weight) pairs mark a composed artefact: it inherits the union of its sources' groups
        and is removed with any of them."""
        raw, _ = read_adapter_dir(directory)
        config = config_from_adapter_json(raw, str(directory))
        weights = (Path(directory) / WEIGHTS_NAME).read_bytes()
        config_text = json.dumps(raw, sort_keys=True)
        sha = hashlib.sha256(weights).hexdigest()
        entry_id = hashlib.sha256(f"{config_text}\n{sha}".encode()).hexdigest()
        name = name or _default_name(Path(directory))
        tags = sorted({_check_label(t, "tag") for t in tags})
        sources = [(self._get(ref), float(w)) for ref, w in derived_from]
        groups = sorted({g for s, _ in sources for g in s["groups"] if g != PUBLIC}) if sources else \
            [_check_label(group, "group")]
        text = f"{name}: {description}" + (f" (tags: {', '.join(tags)})" if tags else "")
        vector = self.embed([text])[0].numpy().astype("float32").tobytes()
        embedder = getattr(self.embedder, "name", type(self.embedder).__name__)
        base = canonical_base(base_model or raw.get("base_model_name_or_path"))
        params = sum(t.numel() for t in load_safetensors_bytes(weights).values())
        with self._write() as con:
            self._check_new(con, entry_id, name)
            self._write_blob(sha, weights)
            con.execute(
                "INSERT INTO adapters (id, name, kind, base_model, method, description, metrics, owner, config, blob,"
                " bytes, parameters, embedding, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (entry_id, name, "composed" if sources else "adapter", base, config.method, description,
                 json.dumps(metrics or {}, sort_keys=True), owner or os.environ.get("USER"), config_text, sha,
                 len(weights), params, vector, time.time()))
            con.executemany("INSERT INTO tags VALUES (?, ?)", [(entry_id, t) for t in tags])
            con.executemany("INSERT INTO access VALUES (?, ?)", [(entry_id, g) for g in groups or [PUBLIC]])
            con.executemany("INSERT INTO derived VALUES (?, ?, ?)", [(entry_id, s["id"], w) for s, w in sources])
            con.execute("INSERT OR IGNORE INTO meta VALUES ('embedder', ?)", (embedder,))
            _inside_add_transaction()
        return self.show(entry_id)

    def _check_new(self, con: sqlite3.Connection, entry_id: str, name: str) -> None:
        same = con.execute("SELECT name FROM adapters WHERE id = ?", (entry_id,)).fetchone()
        if same is not None:
            raise DeltatuneError(f"this adapter is already stored as {same[0]!r}")
        if con.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone():
            raise DeltatuneError(f"the store already has an adapter named {name!r}; pass --name to choose another")

    # ---- read ---------------------------------------------------------------------------------------------------
    def _rows(self, where: str = "", args: tuple = ()) -> list[dict]:
        rows = self._con.execute(f"SELECT * FROM adapters {where} ORDER BY created, name", args).fetchall()
        return [self._entry(row) for row in rows]

    def _entry(self, row: sqlite3.Row) -> dict:
        entry_id = row["id"]
        tags = [r[0] for r in self._con.execute("SELECT tag FROM tags WHERE adapter = ? ORDER BY tag", (entry_id,))]
        groups = [r[0] for r in self._con.execute("SELECT grp FROM access WHERE adapter = ? ORDER BY grp",
                                                  (entry_id,))]
        sources = self._con.execute("SELECT a.name, d.weight FROM derived d JOIN adapters a ON a.id = d.parent "
                                    "WHERE d.child = ? ORDER BY a.name", (entry_id,)).fetchall()
        children = self._con.execute("SELECT a.name FROM derived d JOIN adapters a ON a.id = d.child "
                                     "WHERE d.parent = ? ORDER BY a.name", (entry_id,)).fetchall()
        return entry_from_row(row, tags, groups, [(s[0], s[1]) for s in sources], [c[0] for c in children])

    def _get(self, ref: str, groups: Sequence[str] | None = None) -> dict:
        """The entry named `ref`, or whose id starts with `ref` (at least 6 characters)."""
        rows = self._rows("WHERE name = ?", (ref,))
        if not rows and len(ref) >= 6:
            rows = self._rows("WHERE id LIKE ?", (ref.replace("%", "") + "%",))
        rows = [r for r in rows if is_visible(r["groups"], groups)]
        if len(rows) != 1:
            known = ", ".join(r["name"] for r in self.list(groups=groups)[:8]) or "(none)"
            what = "is ambiguous" if rows else "is not in the store" + ("" if groups is None else " (or not visible "
                                                                        "to your groups)")
            raise DeltatuneError(f"adapter {ref!r} {what}; stored: {known}")
        return rows[0]

    def show(self, ref: str, groups: Sequence[str] | None = None) -> dict:
        entry = self._get(ref, groups)
        entry["blob_path"] = str(self.blob_path(entry["blob"]))
        return entry

    def list(self, *, groups: Sequence[str] | None = None, base_model: str | None = None, method: str | None = None,
             tags: Sequence[str] = (), kind: str | None = None) -> list[dict]:
        """Entries visible to `groups` (None: every entry) matching every filter given."""
        base = canonical_base(base_model)
        out = []
        for entry in self._rows():
            if not is_visible(entry["groups"], groups):
                continue
            if (base and entry["base_model"] != base) or (method and entry["method"] != method) or \
                    (kind and entry["kind"] != kind) or not set(tags) <= set(entry["tags"]):
                continue
            out.append(entry)
        return out

    def search(self, text: str | None = None, *, limit: int = 10, **filters) -> list[dict]:
        """`list` ranked by cosine similarity of `text` to each entry's description embedding."""
        entries = self.list(**filters)
        if not text or not entries:
            return entries[:limit]
        query = self.embed([text])[0]
        ids = tuple(e["id"] for e in entries)
        marks = ",".join("?" * len(ids))
        vectors = {r[0]: r[1] for r in self._con.execute(f"SELECT id, embedding FROM adapters WHERE id IN ({marks})",
                                                         ids)}
        for entry in entries:
            vector = torch.frombuffer(bytearray(vectors[entry["id"]]), dtype=torch.float32)
            entry["score"] = float(vector @ query) if vector.numel() == query.numel() else 0.0
        return sorted(entries, key=lambda e: -e["score"])[:limit]

    def embedding(self, ref: str) -> torch.Tensor:
        row = self._con.execute("SELECT embedding FROM adapters WHERE id = ?", (self._get(ref)["id"],)).fetchone()
        return torch.frombuffer(bytearray(row[0]), dtype=torch.float32)

    # ---- derived caches -----------------------------------------------------------------------------------------
    def cached_prototypes(self, entry_id: str) -> dict[str, torch.Tensor]:
        """Arrow prototypes cached for an entry (path -> vector); empty when none are cached yet."""
        rows = self._con.execute("SELECT path, vector FROM prototypes WHERE adapter = ?", (entry_id,))
        return {path: torch.frombuffer(bytearray(blob), dtype=torch.float32) for path, blob in rows}

    def cache_prototypes(self, entry_id: str, vectors: dict[str, torch.Tensor]) -> None:
        with self._write() as con:
            if con.execute("SELECT 1 FROM adapters WHERE id = ?", (entry_id,)).fetchone() is None:
                return  # removed meanwhile: nothing to cache
            con.executemany("INSERT OR REPLACE INTO prototypes VALUES (?, ?, ?)",
                            [(entry_id, p, v.float().contiguous().numpy().tobytes()) for p, v in vectors.items()])

    # ---- remove and export --------------------------------------------------------------------------------------
    def remove(self, ref: str, groups: Sequence[str] | None = None) -> dict:
        """Delete an entry, every composed artefact derived from it, and their blobs. Says what went."""
        target = self._get(ref, groups)
        with self._write() as con:
            doomed = self._descendants(con, target["id"])
            removed = [self._entry(r) for r in con.execute(
                f"SELECT * FROM adapters WHERE id IN ({','.join('?' * len(doomed))})", tuple(doomed))]
            con.executemany("DELETE FROM adapters WHERE id = ?", [(i,) for i in doomed])
            still = {row[0] for row in con.execute("SELECT blob FROM adapters")}
        blobs = sorted({e["blob"] for e in removed} - still)
        for sha in blobs:  # after COMMIT: a crash here leaves orphans, which the next write collects
            _unlink_blob(self.blob_path(sha))
        return {"removed": target["name"],
                "composed_removed": sorted(e["name"] for e in removed if e["id"] != target["id"]),
                "blobs_deleted": [str(self.blob_path(sha)) for sha in blobs]}

    def _descendants(self, con: sqlite3.Connection, entry_id: str) -> list[str]:
        found, frontier = [entry_id], [entry_id]
        while frontier:
            marks = ",".join("?" * len(frontier))
            frontier = [r[0] for r in con.execute(f"SELECT DISTINCT child FROM derived WHERE parent IN ({marks})",
                                                   tuple(frontier)) if r[0] not in found]
            found += frontier
        return found

    def export(self, ref: str, directory: str | os.PathLike, groups: Sequence[str] | None = None) -> Path:
        """Write the entry as a PEFT-layout adapter directory (a new or empty directory, written atomically)."""
        entry = self._get(ref, groups)
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise DeltatuneError(f"{str(target)!r} already exists and is not empty; export into a new directory")
        if target.is_dir():
            target.rmdir()  # an empty directory: let atomic_write_files create it in one rename
        config = self._con.execute("SELECT config FROM adapters WHERE id = ?", (entry["id"],)).fetchone()[0]
        config_bytes = json.dumps(json.loads(config), indent=2, sort_keys=True).encode()
        return atomic_write_files(target, {WEIGHTS_NAME: self.blob_bytes(entry), CONFIG_NAME: config_bytes})

    @contextlib.contextmanager
    def exported(self, ref: str, groups: Sequence[str] | None = None) -> Iterator[Path]:
        """The entry as an adapter directory in a temporary place, for the duration of the block."""
        with tempfile.TemporaryDirectory(prefix="deltatune-store-") as tmp:
            yield self.export(ref, Path(tmp) / "adapter", groups)

    def tensors(self, ref: str, groups: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return load_safetensors_bytes(self.blob_bytes(self._get(ref, groups)))


def _unlink_blob(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only succeeds once the fan-out directory is empty


def _default_name(directory: Path) -> str:
    directory = directory.resolve()
    return directory.parent.name if directory.name == "adapter" else directory.name


def _check_label(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or "," in value:
        raise DeltatuneError(f"{what} must be a non-empty string without commas, got {value!r}")
    return value.strip()
