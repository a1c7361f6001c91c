"""What the mixture and routing methods share: gates, the load-balancing loss, routing records, library experts.

A helper module: it registers no method. The mixtures built on it:
- self-contained mixtures, whose experts are their own parameters: `moe_lora` / `mola` (moe_lora.py), `hydralora`,
  `moa` (heterogeneous experts of any method), `poly` (task-indexed routing over a skill inventory);
- library mixtures, routing over adapters already attached to the model (trained LoRAs, ...): `xlora` and `arrow`.
  Their config lists the expert adapter names; on every host the experts' deltas come from the host's slot
  (`host.slot[name]`), so they are neither copied nor saved with the mixture (save and load them as usual).

Routers expose their decisions: after each call a routing delta keeps `last_routing` (a `Routing`: the per-token mixing
weights over its experts and, for top-k routers, the chosen indices), and `routing(model, name)` collects them by
module path. Under a mixed batch that falls back to grouped per-row calls, the record covers the last group only.

Load balancing: `switch_balance_loss` is the Switch Transformer auxiliary loss (Fedus et al., 2021,
https://arxiv.org/abs/2101.03961), E·Σₑ fₑ·Pₑ with fₑ the share of routing assignments given to expert e and Pₑ the mean
router probability of e; it is 1 for a perfectly even router. Mixtures record it during training forwards and hand
the weighted mean to the trainer through `regularization_loss()` (cleared on read, so a term is counted once).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.slot import Host, get_state, slots_of

ROUTING_METHODS = ("moe_lora", "mola", "hydralora", "moa", "poly", "xlora", "arrow")


@dataclasses.dataclass(frozen=True)
class Routing:
    """One router's decision for one call on one host.

    Attributes:
        weights: (..., E) the weight each token gives each expert (0 for experts not selected).
        indices: (..., k) the selected experts of a top-k router, best first; None for dense routers.
    """

    weights: Tensor
    indices: Tensor | None = None


def record_routing(delta: Delta, weights: Tensor, indices: Tensor | None = None) -> None:
    """Keep a detached copy of a router's decision on the delta (`delta.last_routing`)."""
    delta.last_routing = Routing(weights.detach(), None if indices is None else indices.detach())


def routing(model: nn.Module, name: str) -> dict[str, Routing]:
    """The last routing decision of mixture adapter `name` on every host, by module path."""
    state = get_state(model)
    if state is None or name not in state.adapters:
        known = sorted(state.adapters) if state is not None else []
        raise DeltatuneError(f"no adapter named {name!r} is attached (attached: {', '.join(known) or 'none'})")
    found = {}
    for path, _, slot in slots_of(model):
        delta = slot._modules.get(name)
        record = getattr(delta, "last_routing", None) if delta is not None else None
        if record is not None:
            found[path] = record
    return found


# ---- gates ------------------------------------------------------------------------------------------------------
def top_k_gate(logits: Tensor, k: int, renormalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(weights (..., E) zero outside the top k, indices (..., k), probabilities (..., E)) of a softmax router.

    renormalize: the k kept probabilities are rescaled to sum to one (Mixtral); False keeps them as they are (Switch
    top-1, whose router then still gets gradient from the task loss)."""
    probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    if k >= probs.shape[-1]:
        indices = probs.argsort(dim=-1, descending=True)
        return probs, indices, probs
    kept, indices = probs.topk(k, dim=-1)
    if renormalize:
        kept = kept / kept.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, indices, kept)
    return weights, indices, probs


def switch_balance_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """E·Σₑ fₑ·Pₑ over the tokens of one call: fₑ = share of the N·k assignments that went to expert e, Pₑ = mean
    probability of e. Equals 1 when both are uniform; grows as the router concentrates on few experts."""
    experts = probs.shape[-1]
    flat_probs = probs.reshape(-1, experts).float()
    counts = torch.zeros(experts, device=probs.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    share = counts / max(indices.numel(), 1)
    return experts * (share * flat_probs.mean(dim=0)).sum()


def records_training_terms(delta: Delta) -> bool:
    """Whether this forward should record a loss term: training, with gradients, and not the recomputation that
    activation checkpointing runs inside backward (its term would outlive the step it belongs to)."""
    return delta.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


def gated_up(h: Tensor, weights: Tensor, up: Tensor) -> Tensor:
    """Σₑ wₑ·Bₑ·hₑ as one matmul: h (..., E, r) the experts' down-projections, weights (..., E),
    up (out, E·r) = [B₁ … B_E]."""
    mixed = (h * weights.unsqueeze(-1).to(h.dtype)).flatten(-2)  # (..., E·r)
    return mixed @ up.t()


class Dense(nn.Module):
    """y = x·Wᵀ + b with nn.Linear's init and state-dict keys, but not an nn.Linear: layers inside a delta must not
    look like host layers to the width inference of module hosts (core.hosts.module_info scans every sub-module)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(kaiming_rows_(torch.empty(out_features, in_features)))  # U(±1/√in), as nn.Linear
        bound = in_features**-0.5
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def kaiming_rows_(tensor: Tensor) -> Tensor:
    """LoRA's A init (uniform, bound 1/√fan_in) for a factor whose last dim is its fan-in; in place."""
    bound = 1.0 / tensor.shape[-1] ** 0.5
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


# ---- routed low-rank experts (MoE-LoRA, MoLA, HydraLoRA) -------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedRankConfig(DeltaConfig):
    """Attributes:
    r: rank of each expert.
    alpha: scaling numerator, s = alpha / r (as LoRA).
    dropout: dropout on the experts' input (the router sees the input without dropout).
    top_k: experts each token uses (the k highest router probabilities); None uses all (dense soft routing).
    renormalize: rescale the k kept probabilities to sum to one; False keeps the raw probabilities (Switch top-1).
    balance_weight: α of the Switch load-balancing loss α·E·Σₑ fₑ·Pₑ added to the training loss (0: off).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    top_k: int | None = 2
    renormalize: bool = True
    balance_weight: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_counts(self.method, r=self.r, **({} if self.top_k is None else {"top_k": self.top_k}))
        if not 0.0 <= self.dropout < 1.0 or self.balance_weight < 0:
            raise DeltatuneError(f"{self.method}: dropout must be in [0, 1) and balance_weight >= 0, got "
                                 f"dropout={self.dropout}, balance_weight={self.balance_weight}")

    def check_top_k(self, experts: int, where: str) -> None:
        if self.top_k is not None and self.top_k > experts:
            raise DeltatuneError(f"{self.method}: top_k={self.top_k} exceeds the {experts} experts {where}; lower "
                                 "top_k or add experts")


class RoutedLowRankDelta(Delta):
    """y + s·Σₑ gₑ(x)·Bₑ·hₑ(x): a softmax router (top-k or dense) over E low-rank experts.

    The subclass creates `lora_A` and gives the experts' down-projections hₑ(x) (`downs`); this class holds the
    router (E, in) and the up-projections `lora_B` (E, out, r), records routing decisions and the balancing loss."""

    fast_parameters = ("lora_B",)

    def __init__(self, config: RoutedRankConfig, info: HostInfo, path: str, experts: int) -> None:
        super().__init__(config, info, path)
        config.check_top_k(experts, f"at {path!r}")
        self.experts, self.r = experts, config.r
        self.top_k = experts if config.top_k is None else config.top_k
        self.scaling = config.alpha / config.r
        self.router = nn.Parameter(kaiming_rows_(torch.empty(experts, info.in_features)))
        self.lora_B = nn.Parameter(torch.zeros(experts, info.out_features, config.r))

    def downs(self, x: Tensor) -> Tensor:
        """hₑ(x) for every expert: (..., E, r)."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        x = x.to(self.router.dtype)
        weights, indices, probs = top_k_gate(x @ self.router.t(), self.top_k, self.config.renormalize)  # (..., E)
        record_routing(self, weights, indices if self.top_k < self.experts else None)
        if self.config.balance_weight > 0 and records_training_terms(self):
            self.__dict__.setdefault("balance_terms", []).append(switch_balance_loss(probs, indices[..., :self.top_k]))
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout)
        up = self.lora_B.permute(1, 0, 2).reshape(self.info.out_features, -1)  # (out, E·r)
        return y + (gated_up(self.downs(x), weights, up) * self.scaling).to(y.dtype)

    def regularization_loss(self) -> Tensor | None:
        terms = self.__dict__.pop("balance_terms", [])
        return self.config.balance_weight * torch.stack(terms).mean() if terms else None


# ---- config checks ----------------------------------------------------------------------------------------------
def check_counts(method: str, **values: int) -> None:
    """One error naming every count that must be >= 1 and is not."""
    bad = [f"{name} must be >= 1 (got {value})" for name, value in values.items() if value < 1]
    if bad:
        raise DeltatuneError(f"{method}: {', '.join(bad)}")


def check_expert_names(method: str, experts: list[str]) -> None:
    """Names listed once each (an empty list is refused at attach, so that a config has usable defaults)."""
    if len(set(experts)) != len(experts):
        raise DeltatuneError(f"{method}: experts names an adapter twice: {experts}")


# ---- library experts: adapters already attached to the same model ---------------------------------------------------
def library_targets(model: nn.Module, method: str, experts: list[str], extra: tuple[str, ...] = ()) -> str:
    """A regex selecting exactly the modules the expert adapters sit on (plus `extra` paths), in model order."""
    _require_experts(method, experts)
    state = get_state(model)
    attached = state.adapters if state is not None else {}
    missing = [e for e in experts if e not in attached]
    if missing:
        raise DeltatuneError(f"{method}: expert adapter(s) {missing} are not attached to this model; attach or load "
                             f"them first (attached: {', '.join(sorted(attached)) or 'none'})")
    paths = {p for e in experts for p in attached[e].paths} | set(extra)
    ordered = [p for p, _ in model.named_modules() if p in paths]
    return "|".join(re.escape(p) for p in ordered)


def _require_experts(method: str, experts: list[str]) -> None:
    if not experts:
        raise DeltatuneError(f"{method}: experts is empty; name the attached adapters to route over, e.g. "
                             "experts=['task_a', 'task_b']")


def library_experts(delta: Delta, host: Host) -> list[tuple[int, Delta]]:
    """(index in the config's expert list, expert delta) for the experts present on this host."""
    slot = host.slot
    found = []
    for index, name in enumerate(delta.config.experts):
        expert = slot._modules.get(name)
        if expert is None:
            continue
        if name in slot.merged_names:
            raise DeltatuneError(f"{delta.config.method}: expert {name!r} is merged into {slot.path!r}; a router "
                                 "cannot weigh a merged update; unmerge it first")
        found.append((index, expert))
    return found


def check_library(delta: Delta, host: Host) -> None:
    """At setup: every expert is attached, none is a router itself, and at least one sits on this host."""
    method, state = delta.config.method, host.slot.state
    _require_experts(method, delta.config.experts)
    for name in delta.config.experts:
        record = state.adapters.get(name)
        if record is None:
            raise DeltatuneError(f"{method}: expert adapter {name!r} is not attached; attach or load it first")
        if record.config.method in ROUTING_METHODS:
            raise DeltatuneError(f"{method}: expert {name!r} is itself a routing adapter ({record.config.method}); "
                                 "route over plain adapters")
    if not any(name in host.slot._modules for name in delta.config.experts):
        raise DeltatuneError(f"{method}: none of the experts {delta.config.experts} sits on {host.slot.path!r}; "
                             "leave targets unset to use the experts' own modules")


def expert_update(expert: Delta, x: Tensor, y: Tensor, host: Host) -> Tensor:
    """What an expert adds to the host output y (its output minus y), computed without writing into y."""
    view = Host(host.module, host.slot, host.base_out)
    view.writable = False
    return expert(x, y, view) - y


__all__ = ["Routing", "routing", "record_routing", "top_k_gate", "switch_balance_loss", "RoutedRankConfig",
           "RoutedLowRankDelta", "gated_up", "library_targets", "library_experts", "check_library", "expert_update"]
