"""Figures (PNG, matplotlib's Agg back-end) and a single-file HTML report for `inspect` and `compare` results.

The report inlines every figure as a base64 data URI, so it opens offline, mailed or copied anywhere. Files are
written atomically (temp name, fsync, rename): an interrupted run never leaves half a report.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from ..core.errors import DeltatuneError
from ..core.io import atomic_write_files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are only ever written to files
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _short(path: str) -> str:
    """A module path short enough for an axis label: layer index and the last name."""
    parts = path.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return ".".join(numbers[-1:] + parts[-1:])


def _layer_axis(ax, paths: list[str]) -> None:
    ax.set_xticks(range(len(paths)))
    step = max(1, len(paths) // 40)
    ax.set_xticklabels([_short(p) if i % step == 0 else "" for i, p in enumerate(paths)], rotation=90, fontsize=6)


def inspect_figures(result: dict) -> dict[str, bytes]:
    """PNG bytes by file name for an `inspect` result (empty when it has no layers)."""
    layers = result.get("layers") or []
    if not layers:
        return {}
    plt = _pyplot()
    paths = [row["path"] for row in layers]
    figures = {}

    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(len(layers)), [row["fro_norm"] for row in layers], color="#4c72b0")
    ax.set_ylabel("‖ΔW‖_F")
    ax.set_title("update norm per layer")
    _layer_axis(ax, paths)
    figures["norms.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in layers:
        values = [v for v in row["singular_values"][: max(1, row["numerical_rank"])] if v > 0]  # not round-off
        if values:
            ax.semilogy(range(1, len(values) + 1), [v / values[0] for v in values], alpha=0.35, lw=0.8)
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title("singular-value spectra of ΔW (one line per layer)")
    figures["spectra.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.plot([row["effective_rank"] for row in layers], "o-", ms=3, label="effective rank")
    ax.plot([row["stable_rank"] for row in layers], "s-", ms=3, label="stable rank")
    ax.legend(fontsize=8)
    ax.set_title("rank of ΔW per layer")
    _layer_axis(ax, paths)
    figures["ranks.png"] = _png(fig)

    if any("intruders" in row for row in layers):
        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.bar(range(len(layers)), [row.get("intruders", {}).get("count", 0) for row in layers], color="#c44e52")
        ax.set_ylabel("intruder dimensions")
        k, eps = next((row["intruders"]["k"], row["intruders"]["epsilon"]) for row in layers if "intruders" in row)
        ax.set_title(f"intruder dimensions per layer (top {k} singular vectors of W₀+ΔW, ε = {eps})")
        _layer_axis(ax, paths)
        figures["intruders.png"] = _png(fig)
    return figures


def compare_figures(result: dict) -> dict[str, bytes]:
    layers = result.get("layers") or []
    if not layers:
        return {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot([row["cosine"] for row in layers], "o-", ms=3, label="cosine of ΔW")
    ax.plot([row["overlap_output"] for row in layers], "s-", ms=3, label="output-subspace overlap")
    ax.plot([row["overlap_input"] for row in layers], "^-", ms=3, label="input-subspace overlap")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("A vs B per layer")
    _layer_axis(ax, [row["path"] for row in layers])
    return {"similarity.png": _png(fig)}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value[:12]) + (" …" if len(value) > 12 else "")
    return html.escape("" if value is None else str(value))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _layer_rows(result: dict) -> tuple[list[dict], list[str]]:
    if "cosine" in (result.get("layers") or [{}])[0]:
        cols = ["path", "cosine", "relative_difference", "overlap_output", "overlap_input", "norm_a", "norm_b"]
        return result["layers"], cols
    rows = []
    for row in result.get("layers") or []:
        intr = row.get("intruders") or {}
        rows.append({**row, "intruders": intr.get("count"), "intruder_strength": intr.get("relative_strength"),
                     "intruder_energy": intr.get("energy_share")})
    return rows, ["path", "shape", "parameters", "fro_norm", "relative_norm", "effective_rank", "stable_rank",
                  "numerical_rank", "intruders", "intruder_strength", "intruder_energy"]


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%;margin:1em 0}")


def html_report(title: str, result: dict, figures: dict[str, bytes]) -> str:
    """One self-contained HTML page: summary, figures (inline PNG), per-layer table."""
    scalars = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    nested = {k: v for k, v in result.items() if isinstance(v, dict)}
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"),
             _table([{"field": k, "value": v} for k, v in scalars.items()], ["field", "value"])]
    for key, value in nested.items():
        rows = [{"field": k, "value": v} for k, v in value.items() if k != "per_module"]  # per layer, below
        parts.append(f"<h2>{html.escape(key)}</h2>" + _table(rows, ["field", "value"]))
    for name, png in figures.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    rows, columns = _layer_rows(result)
    if rows:
        parts.append("<h2>per layer</h2>" + _table(rows, columns))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, title: str, result: dict, figures: dict[str, bytes]) -> Path:
    """Write the HTML report atomically; refuses a directory or a missing-parent path with one clear error."""
    path = Path(path)
    if path.is_dir():
        raise DeltatuneError(f"--report {str(path)!r} is a directory; give a file name such as report.html")
    atomic_write_files(path.parent, {path.name: html_report(title, result, figures).encode()})
    _readable(path)
    return path


def write_figures(directory: str | os.PathLike, figures: dict[str, bytes]) -> Path:
    """Write the PNGs into `directory` (created if needed; each file atomically)."""
    target = atomic_write_files(directory, figures)
    for name in figures:
        _readable(target / name)
    return target


def _readable(path: Path) -> None:
    """The permissions a plain open() would give (the atomic writer's temp files start private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
