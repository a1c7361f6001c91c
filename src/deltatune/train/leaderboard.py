"""`deltatune leaderboard RECIPE`: every method trained the same way, measured the same way.

Each entry is the recipe with only `method` / `delta` (and for initialisations and training tricks, one more field)
changed: same model, data, steps, batch, learning rate and seed. Every run happens in its own process (so its peak
memory is its own) and leaves its usual output directory; the leaderboard collects one JSON per run and writes a
markdown table sorted by the eval metric: metric after training, trainable parameters, train time, tokens/s, peak
memory, adapter size on disk, and the training loss at a few early steps (for convergence-speed claims).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.io import atomic_write_files
from ..core.registry import get_method, list_methods
from ..methods.lora_init import DATA_FREE
from .recipe import load_recipe
from .report import read_metrics


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: a name, the recipe overrides that make it, and what it tests."""

    name: str
    overrides: tuple[str, ...]
    note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def method_entry(method: str, targets) -> Entry:
    spec = get_method(method)
    places_itself = spec.config.default_targets is not DeltaConfig.default_targets  # bottleneck, prompt, ReFT
    fields = {"targets": targets} if "linear" in spec.hosts and not places_itself else {}
    return Entry(method, (f"method={method}", f"delta={json.dumps(fields)}"), spec.family)


# The default subset (~15 minutes on 2 cores): the claims the README discusses — LoRA, DoRA, VeRA (parameters),
# LoHa (structure), LoRA+ (convergence) and PiSSA (initialisation). `--all` runs every method and every init.
DEFAULT = ["lora", "dora", "vera", "loha"]
DEFAULT_INITS = ["pissa"]
INIT_BATCHES = 8  # training batches a data-driven init reads
EXTRA_ENTRIES = {
    "lora+lora_plus": lambda targets: Entry(
        "lora + LoRA+ (ratio 16)", ("method=lora", f"delta={json.dumps({'targets': targets})}",
                                    "optimizer.lora_plus_ratio=16"), "LoRA+ speeds up convergence"),
}
# Every run evaluates once, after training (the base model's score is the same for all; it is in the recipe's demo).
RUN_DEFAULTS = ("eval.before=false", "eval.every=0")


def entries(recipe_targets, all_methods: bool, only: list[str] | None) -> list[Entry]:
    names = sorted(list_methods()) if all_methods else list(only or DEFAULT)
    out = [method_entry(name, recipe_targets) for name in names]
    if not only:
        out += [make(recipe_targets) for make in EXTRA_ENTRIES.values()]
        out += init_entries(recipe_targets, all_methods)
    return out


def init_entries(targets, all_inits: bool) -> list[Entry]:
    """LoRA with each data-free initialisation (read from the base weight): PiSSA by default, all with --all."""
    names = sorted(DATA_FREE) if all_inits else DEFAULT_INITS
    out = [Entry(f"lora init={name}", ("method=lora", f"delta={json.dumps({'targets': targets, 'init': name})}"),
                 "initialisation") for name in names]
    return out + data_driven_init_entries(targets) if all_inits else out


def data_driven_init_entries(targets) -> list[Entry]:
    """LoRA with each data-driven initialisation (EVA, CorDA, LoRA-GA, LoRA-One), computed from the first
    INIT_BATCHES training batches. LoRA-SB initialises its own method (`lora_sb`), not LoRA."""
    from ..algorithms.inits import INITS  # imported late: the algorithms build on the trainer

    return [Entry(f"lora initialize={name}", ("method=lora", f"delta={json.dumps({'targets': targets})}",
                                              f"initialize.name={name}", f"initialize.batches={INIT_BATCHES}"),
                  "initialisation (data-driven)") for name in sorted(INITS) if name != "lora_sb"]


def run_entry(recipe_path: Path, entry: Entry, out_dir: Path, extra: list[str]) -> dict:
    """Train one entry in its own process; returns its row (or the error it stopped with)."""
    run_dir = out_dir / "runs" / entry.name.replace(" ", "_").replace("=", "-").replace("+", "plus")
    overrides = (*RUN_DEFAULTS, f"output_dir={run_dir}", *entry.overrides, *extra)
    args = [sys.executable, "-m", "deltatune.cli", "train", str(recipe_path), "--quiet",
            *[a for o in overrides for a in ("--set", o)]]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    row = {"name": entry.name, "note": entry.note, "overrides": list(entry.overrides),
           "wall_seconds": time.perf_counter() - started}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
        return row
    results = json.loads((run_dir / "results.json").read_text())
    after = results.get("after") or {}
    metrics = read_metrics(run_dir / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in metrics if r.get("kind") == "train"}
    adapter = run_dir / "adapter"
    row.update({
        "eval": {k: v for k, v in after.items() if k != "samples"},
        "before": {k: v for k, v in (results.get("before") or {}).items() if k != "samples"},
        "trainable_parameters": results.get("trainable_parameters"),
        "train_seconds": results.get("train_seconds"), "tokens_per_s": results.get("tokens_per_s"),
        "peak_rss_bytes": results.get("peak_rss_bytes"),
        "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir()) if adapter.is_dir() else None,
        "loss_at": {str(s): losses[s] for s in (5, 10, 20, 40) if s in losses},
    })
    return row


def markdown(rows: list[dict], recipe_path: Path, metric: str) -> str:
    lines = [f"# Leaderboard: `{recipe_path.name}`", "",
             "Generated by `deltatune leaderboard`; every run uses the same model, data, steps, batch, learning rate "
             "and seed, and runs in its own process.", "",
             f"| entry | {metric} | trainable params | train s | tokens/s | peak RSS GiB | adapter KiB | "
             "loss@5 | loss@10 | loss@20 |", "|---|---|---|---|---|---|---|---|---|---|"]
    lower_is_better = metric == "loss"
    ranked = sorted(rows, key=lambda r: (r.get("eval", {}).get(metric) if "eval" in r else float("inf"))
                    if lower_is_better else -(r.get("eval", {}).get(metric) or -1))
    for r in ranked:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        loss = r["loss_at"]
        value = r["eval"].get(metric)
        lines.append(
            f"| {r['name']} | {value if value is None else round(value, 3)} | {r['trainable_parameters']:,} | "
            f"{r['train_seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{r['adapter_bytes'] / 1024:.0f} | " + " | ".join(f"{loss.get(s, float('nan')):.3f}" for s in ("5", "10", "20"))
            + " |")
    return "\n".join(lines) + "\n"


def leaderboard(recipe_path: str | Path, out_dir: str | Path, *, all_methods: bool = False,
                only: list[str] | None = None, extra: list[str] = (), markdown_path: str | Path | None = None,
                echo=print) -> list[dict]:
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, list(extra))
    for name in only or []:
        get_method(name)  # unknown names fail before any training
    targets = recipe.delta.get("targets", "all-linear")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeltatuneError(f"leaderboard output {str(out)!r} exists and is not a directory")
    rows = []
    for entry in entries(targets, all_methods, only):
        echo(f"leaderboard: {entry.name} ...")
        row = run_entry(recipe_path, entry, out, list(extra))
        rows.append(row)
        atomic_write_files(out / "results", {f"{row['name'].replace(' ', '_')}.json": json.dumps(row, indent=2).encode()})
        echo(f"  {row.get('eval', row.get('error'))}")
    metric = next((m for m in ("exact_match", "accuracy", "loss") if rows and m in rows[0].get("eval", {})), "loss")
    table = markdown(rows, recipe_path, metric)
    atomic_write_files(out, {"leaderboard.md": table.encode()})
    if markdown_path:
        target = Path(markdown_path)
        atomic_write_files(target.parent, {target.name: table.encode()})
    return rows
