"""Where deltas live on a model, and how a host module's forward picks them up.

deltatune never replaces or wraps model modules. Each adapted module gets
- a `DeltaSlot` child named `deltatune` (an `nn.ModuleDict` of adapter name -> Delta), so delta parameters are
  ordinary parameters of the model (`q_proj.deltatune.default.lora_A`), and
- a forward hook that reads the model's one `RoutingState` and applies the active deltas to the module's output.

Base modules keep their class, their state-dict keys and their `weight`, so model code that reads
`self.q_proj.weight` (tied embeddings, custom kernels) keeps working, and `detach` is just "remove hook and slot".

Routing lives in one object per model (`RoutingState`), shared by every slot, so the active set can never drift
apart between layers: `active` (names applied in order) or `rows` (one name or None per batch row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .delta import Delta, has_pre_forward
from .errors import DeltatuneError
from .hosts import HostInfo, apply_weight, mergeable_weight, per_channel, read_base_weight

SLOT_ATTR = "deltatune"
STATE_ATTR = "_deltatune_state"
SHARED_CHILD = "shared"  # adapter-wide module: a child of the adapter's first delta, seen by all its deltas


def is_delta_parameter(name: str) -> bool:
    """Whether a model parameter name belongs to a delta (per host or adapter-wide)."""
    return f".{SLOT_ATTR}." in f".{name}"


@dataclass
class AdapterRecord:
    """One attached adapter: its config and the module paths it sits on."""

    config: Any
    paths: list[str]


@dataclass
class RoutingState:
    """The model-wide state every slot reads: adapters, which are active, per-row routing, and caches."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    rows: tuple[str | None, ...] | None = None
    block: Any = None  # a composition (core.compose.Block) when `use` was given one; it overrides `active`
    merged: set[str] = field(default_factory=set)
    requires_grad_before: dict[str, bool] = field(default_factory=dict)
    plans: dict[Any, list] = field(default_factory=dict)

    def reset_plans(self) -> None:
        self.plans = {}


class Host:
    """What a delta sees of its host during a call: the module, its description, and its *unmerged* base weight."""

    __slots__ = ("module", "slot", "base_out", "last", "writable")

    def __init__(self, module: nn.Module, slot: "DeltaSlot", base_out: Tensor | None = None) -> None:
        self.module = module
        self.slot = slot
        self.base_out = base_out  # the module's own output for this call, before any delta
        self.last = True  # the delta running now is the last one on this host for this call
        self.writable = True  # False while a composition block needs the incoming output intact

    def may_overwrite(self, y: Tensor) -> bool:
        """Whether a delta may add into `y` in place: y is then not needed by anyone else.

        The base layer's fresh output is seen by no other code yet, and Linear / Conv1D / Embedding / Conv do not
        keep their output for backward; only a later delta on this host may still read it (as `base_out`).
        Writing in place saves a full-size allocation and two memory passes per adapted layer, which on CPU is
        most of LoRA's cost at small rank.
        """
        return self.writable and (self.last or y is not self.base_out) and y.is_contiguous()

    def select_rows(self, rows: Tensor) -> "Host":
        """This host as seen by a subset of the batch rows."""
        base = None if self.base_out is None else self.base_out.index_select(0, rows)
        return Host(self.module, self.slot, base)

    def positions(self, span: slice) -> "Host":
        """This host as seen by a span of sequence positions (dimension 1)."""
        host = Host(self.module, self.slot, None if self.base_out is None else self.base_out[:, span])
        host.writable = False
        return host

    @property
    def info(self) -> HostInfo:
        return self.slot.info

    def weight(self) -> Tensor:
        """The base weight without any merged deltas (what the deltas were defined against)."""
        weight = read_base_weight(self.module)
        for name, memo_w, _ in self.slot.merged:
            weight = weight - (memo_w if memo_w is not None else self.slot[name].delta_weight(self)).to(weight.dtype)
        return weight

    def bias(self) -> Tensor | None:
        bias = getattr(self.module, "bias", None)
        if bias is None or self.slot.created_bias:
            return None
        for _, _, memo_b in self.slot.merged:
            if memo_b is not None:
                bias = bias - memo_b.to(bias.dtype)
        return bias

    def base_output(self, x: Tensor) -> Tensor:
        """W0·x without bias (layer layout): reuses the module's output when nothing is merged."""
        if self.base_out is not None and not self.slot.merged:
            bias = self.bias()
            return self.base_out if bias is None else self.base_out - per_channel(self.info, bias, self.base_out.ndim)
        weight = self.weight()
        return self.apply(x, weight)

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """The host's own op (linear / embedding lookup / convolution / norm) with `weight` and no bias.

        Floating inputs are cast to the weight's dtype (token ids, for embeddings, are left alone)."""
        if x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        if self.slot.info.kind != "norm":
            return apply_weight(self.module, self.slot.info, x, weight)
        params = {"weight": weight}
        if getattr(self.module, "bias", None) is not None:
            params["bias"] = torch.zeros_like(self.module.bias)
        self.slot.bypass = True  # the module's own forward runs; its hook must not apply deltas again
        try:
            return torch.func.functional_call(self.module, params, (x,))
        finally:
            self.slot.bypass = False


class DeltaSlot(nn.ModuleDict):
    """The deltas on one host module, keyed by adapter name, plus what has been merged into its weight."""

    def __init__(self, info: HostInfo, path: str, state: RoutingState) -> None:
        super().__init__()
        self.info = info
        self.path = path
        self.state = state
        self.merged: list[tuple[str, Tensor | None, Tensor | None]] = []  # (name, ΔW memo, Δb) in merge order
        self.merged_names: set[str] = set()
        self.created_bias = False
        self.hook_handle = None
        self.kernel_cache: dict[type, dict] = {}  # per delta class, kept across routing changes (see per_row)
        self.bypass = False
        self.pre_handle = None  # a forward pre-hook, only for methods that change their host's inputs

    def remove_hooks(self) -> None:
        self.hook_handle.remove()
        if self.pre_handle is not None:
            self.pre_handle.remove()

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Let input-changing deltas (prompt / prefix tuning) rewrite the host's inputs."""
        state = self.state
        if self.bypass:
            return None
        host = Host(module, self)
        if state.rows is not None:
            first = next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor))
            for delta_cls, deltas, slots, cache in self._plan_for(first.shape[0], first.device):
                if has_pre_forward(delta_cls):
                    args, kwargs = delta_cls.per_row_pre_forward(deltas, slots, args, kwargs, host, cache)
            return args, kwargs
        names = state.block.names() if state.block is not None else state.active
        changed = False
        for name in names:
            delta = self._modules.get(name)
            if delta is not None and has_pre_forward(type(delta)):
                args, kwargs = delta.pre_forward(args, kwargs, host)
                changed = True
        return (args, kwargs) if changed else None

    # ---- the hot path -------------------------------------------------------------------------------------------
    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.bypass:
            return None
        if isinstance(output, Tensor) or self.raw:
            return self._apply(module, args, kwargs, output)
        # tuple / ModelOutput hosts (decoder layers, attention blocks): deltas see the hidden states
        if isinstance(output, tuple):
            y = self._apply(module, args, kwargs, output[0])
            return None if y is None else (y, *output[1:])
        y = self._apply(module, args, kwargs, output.last_hidden_state)
        if y is not None:
            output.last_hidden_state = y
        return output

    @property
    def raw(self) -> bool:
        return any(d.raw_output for d in self._modules.values())

    def _apply(self, module: nn.Module, args: tuple, kwargs: dict, output):
        state = self.state
        if state.rows is not None:
            return self._per_row(module, first_input(args, kwargs), output)
        if state.block is not None:
            return state.block.apply(self, first_input(args, kwargs), output, Host(module, self, output))
        chain = [d for n in state.active if (d := self._modules.get(n)) is not None and n not in self.merged_names]
        if not chain:
            return None
        x = first_input(args, kwargs)
        host = Host(module, self, output)
        y = output
        for i, delta in enumerate(chain):
            host.last = i == len(chain) - 1
            y = delta(x, y, host)
        return y

    def _per_row(self, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        plan = self._plan_for(x.shape[0], x.device)
        host = Host(module, self, y)
        for i, (delta_cls, deltas, slots, cache) in enumerate(plan):
            host.last = i == len(plan) - 1
            y = delta_cls.per_row(deltas, slots, x, y, host, cache)
        return y

    def _plan_for(self, batch: int, device: torch.device) -> list:
        """The (cached) per-row plan of the current routing for a batch of `batch` rows."""
        rows = self.state.rows
        if batch % len(rows) != 0:
            raise DeltatuneError(
                f"per_sample got {len(rows)} adapter names but module {self.path!r} sees a batch of {batch} rows; "
                "give one name per batch row"
            )
        key = (id(self), batch, device)
        plan = self.state.plans.get(key)
        if plan is None:
            plan = self._build_plan(rows, batch // len(rows), device)
            self.state.plans[key] = plan
        return plan

    def _build_plan(self, rows: tuple[str | None, ...], repeat: int, device: torch.device) -> list:
        """One entry per delta class routed to in `rows`: (class, every delta of that class on this host, the
        slot of each row in that list or -1, a per-plan cache). Listing every delta of the class, not only the
        routed ones, lets a method keep its stacked factors across routing changes (`kernel_cache`)."""
        routed = {type(self._modules[n]) for n in rows if n is not None and n in self._modules}
        plan = []
        for delta_cls in routed:
            names = [n for n, d in self._modules.items() if type(d) is delta_cls]
            index = {n: i for i, n in enumerate(names)}
            slots = torch.tensor([index.get(n, -1) if n is not None else -1 for n in rows], device=device)
            if repeat > 1:  # generate() expands rows with repeat_interleave (beams, num_return_sequences)
                slots = slots.repeat_interleave(repeat)
            cache = {"kernel_cache": self.kernel_cache.setdefault(delta_cls, {})}
            plan.append((delta_cls, [self._modules[n] for n in names], slots, cache))
        return plan

    # ---- merging ------------------------------------------------------------------------------------------------
    def merged_update(self, module: nn.Module, name: str) -> tuple[Tensor, Tensor | None]:
        """(new weight, new bias) if `name` were merged now; nothing is written."""
        host = Host(module, self)
        delta = self[name]
        weight = read_base_weight(module)
        delta_w = delta.delta_weight(host)
        delta_b = delta.delta_bias(host)
        new_w = weight + delta_w.to(weight.dtype)
        new_b = None
        if delta_b is not None:
            bias = getattr(module, "bias", None)
            new_b = delta_b.to(weight.dtype) if bias is None else bias + delta_b.to(bias.dtype)
        return new_w, new_b

    def merge(self, module: nn.Module, name: str) -> None:
        host = Host(module, self)
        delta = self[name]
        with torch.no_grad():
            delta_w = delta.delta_weight(host).detach()
            delta_b = delta.delta_bias(host)
            param = mergeable_weight(module)
            param.add_(delta_w.to(param.dtype))
            if delta_b is not None:
                delta_b = delta_b.detach()
                if getattr(module, "bias", None) is None:
                    module.bias = nn.Parameter(torch.zeros_like(delta_b, dtype=param.dtype), requires_grad=False)
                    self.created_bias = True
                module.bias.add_(delta_b.to(module.bias.dtype))
        # Deltas computed from the base weight cannot be recomputed once it changes: keep what was added.
        memo_w = delta_w if delta.uses_base_weight else None
        self.merged.append((name, memo_w, delta_b))
        self.merged_names.add(name)

    def unmerge_last(self, module: nn.Module) -> str:
        name, memo_w, memo_b = self.merged[-1]
        self.merged.pop()
        self.merged_names.discard(name)
        host = Host(module, self)
        with torch.no_grad():
            param = mergeable_weight(module)
            delta_w = memo_w if memo_w is not None else self[name].delta_weight(host).detach()
            param.sub_(delta_w.to(param.dtype))
            if memo_b is not None:
                module.bias.sub_(memo_b.to(module.bias.dtype))
                if self.created_bias and not any(m[2] is not None for m in self.merged):
                    del module.bias
                    module.register_parameter("bias", None)
                    self.created_bias = False
        return name


def first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("input", "x", "hidden_states", "input_ids"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()))


def get_state(model: nn.Module) -> RoutingState | None:
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module) -> RoutingState:
    state = get_state(model)
    if state is None:
        raise DeltatuneError("this model has no deltas attached; call deltatune.attach(model, config) or load() first")
    return state


def slots_of(model: nn.Module) -> list[tuple[str, nn.Module, DeltaSlot]]:
    """(path, host module, slot) for every adapted module."""
    out = []
    for path, module in model.named_modules():
        slot = module._modules.get(SLOT_ATTR)
        if isinstance(slot, DeltaSlot):
            out.append((path, module, slot))
    return out
