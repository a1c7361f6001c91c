"""The method catalog as data and as text: what `deltatune methods` prints and what docs/methods.md holds.

Everything here is derived from the registry and the code (capabilities, parameter counts from each method's
formula on a 576×576 layer — SmolLM2-135M's attention width), never typed by hand.
"""

from __future__ import annotations

from typing import Any

from .core.hosts import HostInfo
from .core.registry import list_methods

REFERENCE_LAYER = HostInfo("linear", 576, 576, (), (576, 576), True, -1)


def catalog() -> list[dict[str, Any]]:
    """One dict per registered method: capabilities plus the parameter count on the reference layer."""
    rows = []
    for name, spec in sorted(list_methods().items()):
        row = spec.capabilities()
        if "linear" not in spec.hosts:
            row["params_576x576"] = None
            rows.append(row)
            continue
        try:
            cfg = spec.config()
            row["params_576x576"] = (spec.delta.num_parameters(cfg, REFERENCE_LAYER, "layer")
                                     + spec.delta.num_shared_parameters(cfg, {"layer": REFERENCE_LAYER}))
        except Exception:  # a method that cannot sit on a plain Linear has no such count
            row["params_576x576"] = None
        rows.append(row)
    return rows


def _paper_link(paper: str) -> str:
    title, _, url = paper.rpartition(" ")
    return f"[{title}]({url})" if url.startswith("http") else paper


def markdown_table() -> str:
    """docs/methods.md: one row per method."""
    lines = [
        "# Methods",
        "",
        "Generated from the registry by `deltatune methods --markdown`; do not edit by hand.",
        "Parameters are for one 576×576 Linear layer at default settings.",
        "",
        "| method | family | paper | params (576×576) | merge | mixed batch | PEFT format | identity at init | hosts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in catalog():
        lines.append(
            f"| `{row['name']}` | {row['family']} | {_paper_link(row['paper'])} | {row['params_576x576']} | "
            f"{'yes' if row['merge'] else 'no'} | {row['mixed_batch']} | {row['peft_format'] or '-'} | "
            f"{'yes' if row['identity_at_init'] else 'no'} | {', '.join(row['hosts'])} |"
        )
    return "\n".join(lines) + "\n"


def text_table() -> str:
    """A terminal table."""
    rows = catalog()
    header = ("method", "family", "merge", "mixed batch", "PEFT", "params@576²", "hosts")
    body = [
        (r["name"], r["family"], "yes" if r["merge"] else "no", r["mixed_batch"], r["peft_format"] or "-",
         str(r["params_576x576"]), ",".join(r["hosts"]))
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [header, *body])
