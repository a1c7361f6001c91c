"""MoA: "MoA: Heterogeneous Mixture of Adapters for Parameter-Efficient Fine-Tuning of Large Language Models",
Cao et al., 2025, https://arxiv.org/abs/2506.05928

A mixture whose experts have *different structures*, against the representation collapse and load imbalance of
homogeneous MoE-LoRA. Each expert eₑ is a delta of any registered method (LoRA of several ranks, LoHa, (IA)³, a
bottleneck adapter, ...), given inline as a config dict, and a per-token router weighs what each adds:
    wₑ(x) = σ(router(x)ₑ),   y' = y + Σₑ wₑ(x)·(eₑ(x, y) − y).
Soft MoA (variant="soft") uses every expert; Sparse MoA (variant="sparse") drops, per token, the experts whose weight
is below a learned threshold Γ(x) = Γ_max·σ(w_Γ·x + b_Γ) (Γ_max = `max_threshold`).
Router (the authors' code): a SwiGLU MLP W₂·(silu(W₁x) ⊙ W₃x) with E·`router_expansion` hidden units and zero
biases, or a single linear layer with router_expansion = 0.
Placement: the paper puts LoRA experts on q/k/v/o/down and a parallel adapter on the FFN of each decoder layer under
one router per layer; here every adapted layer gets its own router over its own heterogeneous experts, so any method
that fits a host can be an expert there.
Init: each expert its own method's init (all identity at init ⇒ the mixture is too); router layers nn.Linear's
init. The sparse variant's threshold gets no gradient through its hard mask (as in the authors' code).
Parameters: Σₑ (expert e's count) + the router's (SwiGLU: 2·(in·h + h) + h·E + E, h = E·expansion; linear: in·E + E)
(+ in + 1 for the sparse threshold). On disk: `experts.<e>.<the expert's own key>` and `router.*`, `threshold.*`.
Not mergeable (input-dependent weights). Mixed batches: grouped. Routing decisions: `last_routing`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, has_pre_forward
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo
from ..core.registry import config_from_dict, register_method, spec_of
from ..core.slot import Host
from .mixture import ROUTING_METHODS, Dense, check_counts, expert_update, record_routing


def _default_experts() -> list[dict[str, Any]]:
    return [{"method": "lora", "r": 8, "alpha": 8.0}, {"method": "lora", "r": 2, "alpha": 2.0},
            {"method": "loha", "r": 4}, {"method": "ia3"}]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoaConfig(DeltaConfig):
    """Attributes:
    experts: the experts of every adapted layer, each a config dict of a registered method ({"method": "lora",
        "r": 8}); their targets fields are ignored (the mixture's own targets place them).
    variant: "soft" (weighted sum of all experts) or "sparse" (experts under a learned per-token threshold dropped).
    router_expansion: hidden units of the SwiGLU router per expert (the paper's 4); 0 gives a linear router.
    max_threshold: Γ_max, the largest threshold of the sparse variant.
    """

    experts: list[dict[str, Any]] = dataclasses.field(default_factory=_default_experts)
    variant: Literal["soft", "sparse"] = "soft"
    router_expansion: int = 4
    max_threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not self.experts:
            raise DeltatuneError("moa: experts is empty; give expert configs, e.g. [{'method': 'lora', 'r': 8}, "
                                 "{'method': 'ia3'}]")
        for index, expert in enumerate(self.expert_configs()):
            spec = spec_of(expert)
            if spec.name in ROUTING_METHODS or has_pre_forward(spec.delta) or spec.delta.raw_output or \
                    spec.delta.make_shared.__func__ is not Delta.make_shared.__func__:
                raise DeltatuneError(f"moa: expert {index} ({spec.name}) cannot be a mixture expert: it routes, "
                                     "changes its host's inputs or has adapter-wide tensors; pick a per-layer method")
        if self.router_expansion < 0 or not 0.0 < self.max_threshold <= 1.0:
            raise DeltatuneError(f"moa: router_expansion must be >= 0 and max_threshold in (0, 1], got "
                                 f"{self.router_expansion}, {self.max_threshold}")

    def expert_configs(self) -> list[DeltaConfig]:
        configs = []
        for index, expert in enumerate(self.experts):
            if not isinstance(expert, dict) or "method" not in expert:
                raise DeltatuneError(f"moa: experts[{index}] must be a config dict with a 'method' key, got {expert!r}")
            fields = {k: v for k, v in expert.items() if k not in ("targets", "exclude", "layers", "layers_pattern")}
            configs.append(config_from_dict(fields))
        return configs


def _router(info: HostInfo, experts: int, expansion: int) -> nn.Module:
    if expansion == 0:
        return Dense(info.in_features, experts)
    router = nn.ModuleDict({"w1": Dense(info.in_features, experts * expansion),
                            "w2": Dense(experts * expansion, experts),
                            "w3": Dense(info.in_features, experts * expansion)})
    for layer in router.values():
        nn.init.zeros_(layer.bias)
    return router


class MoaDelta(Delta):
    """Heterogeneous experts (sub-deltas of other methods) under a sigmoid router."""

    def __init__(self, config: MoaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        configs = config.expert_configs()
        for index, expert in enumerate(configs):
            if info.kind not in spec_of(expert).hosts:
                raise DeltatuneError(f"moa: expert {index} ({expert.method}) cannot sit on {path!r} ({info.kind})")
        self.experts = nn.ModuleList(spec_of(c).delta(c, info, path) for c in configs)
        self.router = _router(info, len(configs), config.router_expansion)
        self.threshold = Dense(info.in_features, 1) if config.variant == "sparse" else None
        # The experts' own frozen / fast parameters keep their roles under the mixture's prefix.
        self.frozen_parameters = self._prefixed("frozen_parameters")
        self.fast_parameters = self._prefixed("fast_parameters")

    def _prefixed(self, role: str) -> tuple[str, ...]:
        return tuple(f"experts.{i}.{name}" for i, e in enumerate(self.experts) for name in getattr(e, role))

    def setup(self, host: Host) -> None:
        for expert in self.experts:
            expert.setup(host)

    def gate(self, x: Tensor) -> Tensor:
        """(..., E) expert weights for each token."""
        router = self.router
        if isinstance(router, nn.ModuleDict):
            logits = router["w2"](F.silu(router["w1"](x)) * router["w3"](x))
        else:
            logits = router(x)
        weights = torch.sigmoid(logits)
        if self.threshold is not None:  # Sparse MoA: experts under the token's threshold are off
            floor = self.config.max_threshold * torch.sigmoid(self.threshold(x))
            weights = weights * (weights >= floor).to(weights.dtype)
        return weights

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        weights = self.gate(x.to(next(self.router.parameters()).dtype))
        record_routing(self, weights)
        out = y
        for index, expert in enumerate(self.experts):
            out = out + weights[..., index : index + 1].to(y.dtype) * expert_update(expert, x, y, host)
        return out

    @classmethod
    def identity_for(cls, config: MoaConfig) -> bool:
        return all(spec_of(c).delta.identity_for(c) for c in config.expert_configs())

    @classmethod
    def num_parameters(cls, config: MoaConfig, info: HostInfo, path: str) -> int:
        configs = config.expert_configs()
        count = sum(spec_of(c).delta.num_parameters(c, info, path) for c in configs)
        experts, expansion, width = len(configs), config.router_expansion, info.in_features
        hidden = experts * expansion
        if expansion == 0:
            count += width * experts + experts
        else:
            count += 2 * (width * hidden + hidden) + hidden * experts + experts
        return count + (width + 1 if config.variant == "sparse" else 0)

    # ---- on disk: each expert under its index, with its own keys ---------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        out = {f"experts.{i}.{k}": v for i, e in enumerate(self.experts) for k, v in e.state_tensors(host).items()}
        out.update({k: v.detach() for k, v in self._own_state().items() if not k.startswith("experts.")})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        per_expert: list[dict[str, Tensor]] = [{} for _ in self.experts]
        own = self._own_state()
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("experts."):
                    index, suffix = key[len("experts."):].split(".", 1)
                    per_expert[int(index)][suffix] = value
                else:
                    own[key].copy_(value)
        for expert, part in zip(self.experts, per_expert):
            expert.load_state_tensors(part, host)


PAPER = ("MoA: Heterogeneous Mixture of Adapters for Parameter-Efficient Fine-Tuning of Large Language Models "
         "(Cao et al., 2025) https://arxiv.org/abs/2506.05928")
register_method("moa", config=MoaConfig, family="mixture", paper=PAPER, hosts=LINEAR_KINDS)(MoaDelta)
