"""Plain-text renderings of analysis and store results for the terminal (the data itself stays in dicts)."""

from __future__ import annotations

TOP_LAYERS = 12


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict], columns: list[str], widths: dict[str, int] | None = None) -> str:
    widths = widths or {}
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    sizes = [min(widths.get(c, 60), max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(s) for c, s in zip(columns, sizes))]
    for r in cells:
        lines.append("  ".join((v if len(v) <= s else v[: s - 1] + "…").ljust(s) for v, s in zip(r, sizes)))
    return "\n".join(lines)


def inspect_text(result: dict) -> str:
    params = result.get("parameters") or {}
    lines = [f"adapter: {result['adapter']}", f"method: {result['method']}"]
    if params:
        lines.append(f"parameters: {params['total']:,} ({params['adapter_wide']:,} adapter-wide), "
                     f"{len(result.get('targets', []))} modules")
    if result.get("analysed_against"):
        lines.append(f"base model: {result['analysed_against']}")
    if result.get("note"):
        lines.append(result["note"])
    summary = result.get("summary") or {}
    if summary.get("layers"):
        lines.append(f"layers: {summary['layers']}, total ‖ΔW‖_F {summary['total_fro_norm']:.4g}, mean effective "
                     f"rank {summary['mean_effective_rank']:.3g}, largest update at {summary['largest_update']}")
        if summary.get("total_intruders") is not None:
            lines.append(f"intruder dimensions: {summary['total_intruders']} in {summary['layers_with_intruders']} "
                         "layers")
        rows = sorted(result["layers"], key=lambda r: -r["fro_norm"])[:TOP_LAYERS]
        for row in rows:
            row["intruder_count"] = (row.get("intruders") or {}).get("count")
        lines.append(f"\nlargest updates (of {len(result['layers'])}; --json or --report for all):")
        lines.append(table(rows, ["path", "fro_norm", "relative_norm", "effective_rank", "stable_rank",
                                  "numerical_rank", "intruder_count"]))
    size = result.get("dataset_size")
    if size:
        lines.append(f"\nDSiRe estimate: {size['estimate']} training examples ({size['agreement']:.0%} of "
                     f"{size['layers']} layers agree; votes {size['votes']})")
    return "\n".join(lines)


def compare_text(result: dict) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}", f"base model: {result.get('analysed_against')}",
             f"common layers: {len(result['layers'])}, mean cosine of ΔW: {_fmt(result['mean_cosine'])}"]
    if result["only_a"] or result["only_b"]:
        lines.append(f"only in A: {len(result['only_a'])} layers, only in B: {len(result['only_b'])} layers")
    worst = [r for p in result["most_different"] for r in result["layers"] if r["path"] == p]
    lines.append("\nlayers that differ most:")
    lines.append(table(worst, ["path", "cosine", "relative_difference", "overlap_output", "overlap_input"]))
    return "\n".join(lines)


def entries_text(entries: list[dict]) -> str:
    if not entries:
        return "(no adapters)"
    rows = [{**e, "groups": ",".join(e["groups"]), "tags": ",".join(e["tags"]), "id": e["id"][:12]} for e in entries]
    columns = ["name", "id", "kind", "method", "base_model", "groups", "tags", "parameters", "description"]
    if any("score" in e for e in entries):
        columns.insert(1, "score")
    return table(rows, columns, {"description": 50, "base_model": 30})
