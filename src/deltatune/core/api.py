"""The public model-level API: attach, detach, use, per_sample, merge, unmerge, delete, trainable_parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .compose import BatchSplit, Block, Node, Parallel, check_tree
from .config import DeltaConfig
from .errors import DeltatuneError, one_of
from .hosts import host_info, mergeable_weight, module_info, placement_of
from .delta import has_pre_forward
from .registry import MethodSpec, spec_of
from .slot import (
    SHARED_CHILD,
    SLOT_ATTR,
    STATE_ATTR,
    AdapterRecord,
    DeltaSlot,
    Host,
    RoutingState,
    get_state,
    is_delta_parameter,
    require_state,
    slots_of,
)
from .targeting import find_targets


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` described by `config` to `model` in place; it becomes the active adapter.

    The model's own parameters are frozen; the new delta parameters train. Returns the model.
    """
    spec = spec_of(config)
    paths = find_targets(model, config, spec.accepts, ", ".join(spec.hosts))
    return attach_at(model, config, paths, name)


def attach_at(model: nn.Module, config: DeltaConfig, paths: Sequence[str], name: str) -> nn.Module:
    """Attach at explicit module paths (used by `load`, which takes the paths from the file)."""
    spec = spec_of(config)
    _check_name(name)
    state = get_state(model)
    if state is not None and name in state.adapters:
        raise DeltatuneError(f"an adapter named {name!r} is already attached; pick another name or delete it first")
    fresh = state is None
    if fresh:
        state = RoutingState()
        state.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        setattr(model, STATE_ATTR, state)
    modules = dict(model.named_modules())
    try:
        shared = _make_shared(model, spec, config, {p: _info(modules[p], p) for p in paths}, name)
        for i, path in enumerate(paths):
            _add_delta(spec, config, modules[path], path, name, state, shared, owns_shared=i == 0)
    except BaseException:
        _remove_adapter(model, name, state)
        if fresh:
            delattr(model, STATE_ATTR)
        raise
    for n, p in model.named_parameters():
        if not is_delta_parameter(n):
            p.requires_grad_(False)
    state.adapters[name] = AdapterRecord(config, list(paths))
    state.active = (name,)
    state.rows = None
    state.reset_plans()
    return model


def _make_shared(model: nn.Module, spec: MethodSpec, config: DeltaConfig, infos: dict, name: str) -> nn.Module | None:
    """The adapter-wide module, placed beside the first host's weights. It is registered under the adapter's
    first delta only (so it is saved, moved and trained once, and the model's own module tree is untouched: a
    root nn.Sequential keeps calling only its layers), and every delta of the adapter sees it as `self.shared`."""
    shared = spec.delta.make_shared(config, infos)
    if shared is None:
        return None
    device, dtype = placement_of(dict(model.named_modules())[next(iter(infos))])
    shared.to(device=device, dtype=dtype)
    for p in shared.parameters():
        p.requires_grad_(True)
    return shared


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise DeltatuneError(f"adapter name must be a non-empty string without '.' or '/', got {name!r}")


def _add_delta(spec: MethodSpec, config: DeltaConfig, module: nn.Module, path: str, name: str, state,
               shared: nn.Module | None, owns_shared: bool) -> None:
    info = _info(module, path)
    slot = module._modules.get(SLOT_ATTR)
    if slot is None:
        if hasattr(module, SLOT_ATTR):
            raise DeltatuneError(f"module {path!r} already has an attribute {SLOT_ATTR!r}; cannot attach here")
        slot = DeltaSlot(info, path, state)
        module.add_module(SLOT_ATTR, slot)
        slot.hook_handle = module.register_forward_hook(slot.hook, with_kwargs=True)
    device, dtype = placement_of(module)
    delta = spec.delta(config, info, path)
    delta.to(device=device, dtype=dtype)
    delta.train(module.training)  # a model in eval mode gets deltas in eval mode (dropout off)
    for pname, p in delta.named_parameters():
        p.requires_grad_(pname not in delta.frozen_parameters)
    if shared is not None:
        if owns_shared:
            delta._modules[SHARED_CHILD] = shared  # registered once, under the first delta
        object.__setattr__(delta, "shared", shared)  # plain attribute on every delta (and on the first too)
    slot[name] = delta
    if has_pre_forward(type(delta)) and slot.pre_handle is None:
        slot.pre_handle = module.register_forward_pre_hook(slot.pre_hook, with_kwargs=True)
    with torch.no_grad():
        delta.setup(Host(module, slot))


def _info(module: nn.Module, path: str):
    return host_info(module, path) or module_info(module, path)


def _remove_adapter(model: nn.Module, name: str, state: RoutingState) -> None:
    for _, module, slot in slots_of(model):
        if name in slot:
            del slot[name]
        if len(slot) == 0:
            slot.remove_hooks()
            del module._modules[SLOT_ATTR]



def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove one adapter (not merged) from the model."""
    state = require_state(model)
    _known(state, [name])
    if name in _merged(model):
        raise DeltatuneError(f"adapter {name!r} is merged; unmerge it before deleting it")
    _remove_adapter(model, name, state)
    del state.adapters[name]
    state.active = tuple(n for n in state.active if n != name)
    state.rows = None
    state.reset_plans()
    return model


def detach(model: nn.Module) -> nn.Module:
    """The plain model back: hooks and deltas removed, requires_grad flags restored.

    Merged deltas stay in the weights (as PEFT's merge_and_unload).
    """
    state = require_state(model)
    for _, module, slot in slots_of(model):
        slot.remove_hooks()
        del module._modules[SLOT_ATTR]
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad_before.get(n, True))
    delattr(model, STATE_ATTR)
    return model


def adapters(model: nn.Module) -> dict[str, DeltaConfig]:
    """Attached adapters by name, with their configs."""
    state = get_state(model)
    return {} if state is None else {n: r.config for n, r in state.adapters.items()}


def active(model: nn.Module) -> tuple[str, ...]:
    state = get_state(model)
    return () if state is None else state.active


def _known(state: RoutingState, names: Iterable[str | None]) -> None:
    for n in names:
        if n is not None and n not in state.adapters:
            raise one_of("adapter", n, state.adapters)


def _merged(model: nn.Module) -> set[str]:
    return require_state(model).merged


def _record_merged(model: nn.Module, state: RoutingState) -> None:
    state.merged = {n for _, _, slot in slots_of(model) for n in slot.merged_names}


class use:
    """Make `names` the active adapters (applied in order); None or [] means the base model. A composition block
    (`deltatune.Stack`, `Average`, `BatchSplit`, `Split`, `Fuse`) routes every adapted layer through that tree.

    Works as a context manager (restores the previous routing on exit) or as a plain call (stays in effect).
    """

    def __init__(self, model: nn.Module, names: str | Sequence[str] | Block | None) -> None:
        state = require_state(model)
        block = None
        if isinstance(names, Block):
            if isinstance(names, Parallel):
                raise DeltatuneError("Parallel runs the model once per child: call deltatune.parallel(model, ...)")
            check_tree(names)
            block, chosen = names, tuple(dict.fromkeys(names.names()))
        else:
            chosen = () if names is None else (names,) if isinstance(names, str) else tuple(names)
            if len(set(chosen)) != len(chosen):
                raise DeltatuneError(f"use() got a name twice: {list(chosen)}")
        _known(state, chosen)
        left_out = _merged(model) - set(chosen)
        if left_out:
            raise DeltatuneError(
                f"adapter(s) {sorted(left_out)} are merged into the weights and cannot be switched off; "
                "call deltatune.unmerge(model) first"
            )
        self._switch(state, chosen, None, block)

    def _switch(self, state: RoutingState, active: tuple, rows, block) -> None:
        self.state = state
        self.previous = (state.active, state.rows, state.block)
        state.active, state.rows, state.block = active, rows, block
        state.reset_plans()

    def __enter__(self) -> "use":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state.active, self.state.rows, self.state.block = self.previous
        self.state.reset_plans()


def parallel(model: nn.Module, block: Parallel | Sequence[Node], *args: Any, **kwargs: Any) -> Any:
    """Run the same inputs through each child of `block` in one forward pass; outputs are stacked child-major along
    the batch (rows [k·B, (k+1)·B) belong to child k). Tensor arguments are replicated along dimension 0."""
    children = block.children if isinstance(block, Parallel) else tuple(block)
    batch = next((a.shape[0] for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    if batch is None:
        raise DeltatuneError("parallel() needs at least one tensor input with a batch dimension")
    tile = lambda a: a.repeat(len(children), *([1] * (a.ndim - 1))) if torch.is_tensor(a) else a  # noqa: E731
    with use(model, BatchSplit(*children, sizes=[batch] * len(children))):
        return model(*[tile(a) for a in args], **{k: tile(v) for k, v in kwargs.items()})


class per_sample(use):
    """Route each batch row to its own adapter: `names[i]` (or None for the base model) for row i.

    Rows are computed together through each method's gathered per-row path. A batch that generate() expanded
    (beams, several sequences per prompt) is matched by repeating each name.
    """

    def __init__(self, model: nn.Module, names: Sequence[str | None]) -> None:
        state = require_state(model)
        if isinstance(names, str) or not names:
            raise DeltatuneError("per_sample needs a list with one adapter name (or None) per batch row")
        rows = tuple(names)
        _known(state, rows)
        merged = _merged(model)
        if merged:
            raise DeltatuneError(
                f"adapter(s) {sorted(merged)} are merged into the weights; unmerge before per-sample routing"
            )
        self._switch(state, (), rows, None)


def merge(model: nn.Module, names: str | Sequence[str] | None = None, safe: bool = True) -> nn.Module:
    """Add adapters' updates into the base weights (reversible with `unmerge`).

    names: adapters to merge (default: the active ones). safe: check every merged weight for NaN/Inf before
    writing anything, and refuse (model untouched) if one is not finite.
    """
    state = require_state(model)
    chosen = list(state.active if names is None else ([names] if isinstance(names, str) else names))
    if not chosen:
        raise DeltatuneError("no adapter to merge: none is active; pass names=[...]")
    _known(state, chosen)
    for n in chosen:
        spec = spec_of(state.adapters[n].config)
        if not spec.mergeable:
            raise DeltatuneError(f"adapter {n!r} ({spec.name}) acts on activations and cannot be merged into weights")
    targets = [(p, m, s) for p, m, s in slots_of(model)]
    _refuse_tied(model, targets, chosen)
    todo = [n for n in chosen if n not in _merged(model)]
    for _, module, slot in targets:  # a quantised host anywhere refuses the merge before any weight changes
        if any(n in slot for n in todo):
            mergeable_weight(module)
    if safe:
        _check_finite(targets, todo)
    for _, module, slot in targets:
        for n in todo:
            if n in slot:
                slot.merge(module, n)
    _record_merged(model, state)
    state.reset_plans()
    return model


def _check_finite(targets, names: list[str]) -> None:
    with torch.no_grad():
        for path, module, slot in targets:
            for n in names:
                if n in slot:
                    weight, bias = slot.merged_update(module, n)
                    bad = not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all())
                    if bad:
                        raise DeltatuneError(
                            f"merging adapter {n!r} gives NaN/Inf weights at {path!r}; model left unchanged "
                            "(check the adapter's weights, or merge in a wider dtype)"
                        )


def _refuse_tied(model: nn.Module, targets, names: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(mpath)
    for path, module, slot in targets:
        shared = owners.get(id(module.weight), [])
        if len(set(shared)) > 1 and any(n in slot for n in names):
            raise DeltatuneError(
                f"cannot merge into {path!r}: its weight is tied to {sorted(set(shared) - {path})}, which would "
                "change too; keep the adapter unmerged or untie the weights first"
            )


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Take merged adapters back out of the weights (all merged ones by default), newest first."""
    state = require_state(model)
    wanted = None if names is None else set([names] if isinstance(names, str) else names)
    if wanted is not None:
        _known(state, wanted)
    targets = slots_of(model)
    for _, _, slot in targets:  # check everything before changing anything
        order = [n for n, _, _ in slot.merged]
        tail = order[len(order) - len(wanted & set(order)):] if wanted is not None else order
        if wanted is not None and set(tail) != wanted & set(order):
            raise DeltatuneError(
                f"at {slot.path!r}, {sorted(wanted & set(order))} were merged before {order[-1]!r}; "
                "unmerge in reverse order of merging (or unmerge all)"
            )
    for _, module, slot in targets:
        while slot.merged and (wanted is None or slot.merged[-1][0] in wanted):
            slot.unmerge_last(module)
    _record_merged(model, state)
    state.reset_plans()
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should train: delta parameters with requires_grad set."""
    return [p for _, p in named_trainable_parameters(model)]


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and is_delta_parameter(n)]


def set_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Switch training of one adapter's parameters on or off."""
    state = require_state(model)
    _known(state, [name])
    for _, _, slot in slots_of(model):
        if name in slot:
            delta = slot[name]
            for pname, p in delta.named_parameters():
                p.requires_grad_(trainable and pname not in delta.frozen_parameters)


def shared_of(model: nn.Module, name: str) -> nn.Module | None:
    """The adapter-wide module of adapter `name`, if its method has one."""
    for _, _, slot in slots_of(model):
        if name in slot:
            return slot[name].__dict__.get(SHARED_CHILD)
    return None
