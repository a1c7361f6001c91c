"""Targeting: which modules of a model a delta goes on. A pure function of the model and the config.

Semantics follow PEFT's so adapter configs mean the same thing in both tools:
- a string is a regex that must fully match the module path;
- a list entry matches a path exactly or as a dotted suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`);
- `"all-linear"` is every Linear / transformers Conv1D except the output head;
- `exclude` uses the same forms; `layers` keeps modules whose layer index is listed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .errors import DeltatuneError, closest
from .hosts import host_kind

# Per-architecture defaults when a config gives no targets (the attention query/value projections, as LoRA did).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
}
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")


def _as_list(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def matches(path: str, spec: str | list[str]) -> bool:
    """Whether a module path is selected by a target spec (regex string or list of names)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def layer_index(path: str, pattern: str | list[str] | None) -> int | None:
    """The number that follows a layer container name in the path (`model.layers.3.mlp` -> 3)."""
    names = _as_list(pattern) or list(LAYER_CONTAINERS)
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in names and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head (excluded from 'all-linear'), found through transformers' accessor."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {path for path, module in model.named_modules() if module is head}


def resolve_targets_spec(model: nn.Module, targets: str | list[str] | None) -> str | list[str]:
    if targets is not None:
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise DeltatuneError(
        f"no targets given and no default for model type {model_type!r}; pass targets=[...] "
        "(module names), a regex, or 'all-linear'"
    )


def find_targets(
    model: nn.Module,
    config,
    accepts: Callable[[nn.Module], bool],
    accepts_what: str,
) -> list[str]:
    """Module paths selected by `config` (targets / exclude / layers) that the method can adapt.

    Raises DeltatuneError when nothing matches (showing the closest module names) or when a selected module is of
    a type the method cannot adapt (naming it and the supported types).
    """
    spec = config.targets if config.targets is not None else config.default_targets(model)
    spec = resolve_targets_spec(model, spec)
    named = [(p, m) for p, m in model.named_modules() if p and not _inside_slot(p)]
    if spec == "all-linear":
        heads = output_head_paths(model)
        chosen = [(p, m) for p, m in named if host_kind(m) in ("linear", "conv1d_hf") and p not in heads]
    else:
        chosen = [(p, m) for p, m in named if matches(p, spec)]
    if config.exclude is not None:
        chosen = [(p, m) for p, m in chosen if not matches(p, config.exclude)]
    if config.layers is not None:
        wanted = {config.layers} if isinstance(config.layers, int) else set(config.layers)
        chosen = [(p, m) for p, m in chosen if layer_index(p, config.layers_pattern) in wanted]
    if not chosen:
        raise _nothing_matched(named, spec, config)
    rejected = [(p, m) for p, m in chosen if not accepts(m)]
    if rejected and isinstance(spec, list):
        # An explicit name that hits a container (e.g. "mlp") is a mistake worth naming.
        p, m = rejected[0]
        raise DeltatuneError(
            f"{config.method}: target {p!r} is a {type(m).__name__}, which it cannot adapt (supports {accepts_what}); "
            "name its linear sub-modules instead"
        )
    # A regex may sweep in containers whose names fit; keep what the method can adapt.
    chosen = [(p, m) for p, m in chosen if accepts(m)]
    if not chosen:
        p, m = rejected[0]
        raise DeltatuneError(
            f"{config.method}: targets {spec!r} matched only modules it cannot adapt (e.g. {p!r}, a "
            f"{type(m).__name__}); it supports {accepts_what}"
        )
    return [p for p, _ in chosen]


def _inside_slot(path: str) -> bool:
    """Modules of deltatune's own deltas are never targets."""
    return ".deltatune." in f".{path}." or path.startswith("deltatune.")


def _nothing_matched(named: list[tuple[str, nn.Module]], spec, config) -> DeltatuneError:
    paths = [p for p, _ in named]
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    probe = spec if isinstance(spec, str) else " ".join(spec)
    hints = closest(probe.rsplit(".", 1)[-1], leaves | set(paths[:200]))
    extra = ""
    if config.layers is not None:
        extra = f" with layers={config.layers!r}"
    if config.exclude is not None:
        extra += f" after exclude={config.exclude!r}"
    return DeltatuneError(
        f"{config.method}: targets {spec!r}{extra} matched no module; closest module names: {', '.join(hints)}"
    )
