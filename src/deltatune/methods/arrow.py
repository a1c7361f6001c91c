"""Arrow: "Towards Modular LLMs by Building and Reusing a Library of LoRAs", Ostapenko et al., 2024,
https://arxiv.org/abs/2405.11157

Zero-shot routing over a library of trained adapters (the experts, attached to the model under their own names),
with no training and no data: on every layer, expert e is represented by the prototype vₑ, the top right singular
vector of its update ΔWₑ (for LoRA, of B·A) — the input direction it changes most. A token x is routed by
    sₑ = |vₑ·x|   (sign-free: a singular vector is defined up to sign),
    keep the top_k scores, cₑ = softmax(sₑ / τ) over them (0 for the others),   y' = y + Σₑ cₑ·Δₑ(x),
where Δₑ(x) is what expert e adds on that layer. Prototypes are exact (an SVD of the r × r core for factored experts,
of ΔW otherwise), computed on first use and recomputed when an expert's tensors change (PEFT approximates them with
15 power iterations; PEFT's general-knowledge subtraction, GenKnowSub, is not implemented).
Experts: any adapters whose update is a weight (`delta_weight`), on Linear / transformers Conv1D layers.
No trainable parameters; on disk the prototypes (`arrow_prototypes`, one row per expert on the layer, in the order of
`experts`), which a loaded router uses until an expert changes. Not mergeable. Mixed batches: grouped.
Inspection: `last_routing` (weights cₑ and the chosen experts) on every layer; `prototypes(model, name)`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, base_weight_parameter, to_matrix
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .factored import FactoredDelta
from .mixture import check_counts, check_expert_names, check_library, expert_update, library_experts, \
    library_targets, record_routing


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArrowConfig(DeltaConfig):
    """Attributes:
    experts: names of the attached adapters to route over.
    top_k: experts each token uses (PEFT's default 3, capped at the number of experts on a layer).
    temperature: τ of the softmax over the kept scores (router_temperature).
    """

    experts: list[str] = dataclasses.field(default_factory=list)
    top_k: int = 3
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_expert_names(self.method, self.experts)
        check_counts(self.method, top_k=self.top_k)
        if self.temperature <= 0:
            raise DeltatuneError(f"arrow: temperature must be > 0, got {self.temperature}")

    def default_targets(self, model: nn.Module) -> str:
        return library_targets(model, self.method, self.experts)


def top_right_singular_vector(delta: Delta, host: Host) -> Tensor:
    """v with ‖v‖ = 1 maximising ‖ΔW·v‖ (matrix view, length fan_in), in float32."""
    if isinstance(delta, FactoredDelta):
        down, up = delta.factors(host)  # ΔW = up·down; with downᵀ = Q·R: ΔW = (up·Rᵀ)·Qᵀ, an SVD of (out, k) only
        q, r = torch.linalg.qr(down.detach().float().t())
        _, _, vh = torch.linalg.svd(up.detach().float() @ r.t(), full_matrices=False)
        return q @ vh[0]
    weight = delta.delta_weight(host)
    if weight is None:
        raise DeltatuneError(f"arrow: expert {type(delta).__name__} at {host.slot.path!r} has no weight update to "
                             "take a prototype from; route over weight methods (LoRA, ...)")
    _, _, vh = torch.linalg.svd(to_matrix(host.info, weight.detach()).float(), full_matrices=False)
    return vh[0]


def _version_key(expert: Delta, host: Host) -> tuple:
    tensors = [*expert.parameters(), *expert.buffers()]
    if expert.uses_base_weight:
        tensors.append(base_weight_parameter(host.module))
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors)


class ArrowDelta(Delta):
    """Routes each token over the library experts on this layer by |prototype·x|."""

    identity_at_init = False

    def setup(self, host: Host) -> None:
        check_library(self, host)
        self.cached: tuple | None = None  # (key, prototypes (E_here, fan_in))

    def prototypes(self, host: Host) -> Tensor:
        """(E_here, in) prototypes of the experts present on this layer, in library_experts order."""
        experts = library_experts(self, host)
        key = tuple((index, _version_key(expert, host)) for index, expert in experts)
        if self.cached is None or self.cached[0] != key:
            with torch.no_grad():
                stack = torch.stack([top_right_singular_vector(expert, host) for _, expert in experts])
            self.cached = (key, stack)
        return self.cached[1]

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        experts = library_experts(self, host)
        protos = self.prototypes(host)
        scores = (x.to(protos.dtype) @ protos.t()).abs()  # (..., E_here)
        k = min(self.config.top_k, len(experts))
        kept, chosen = scores.topk(k, dim=-1)
        coefficients = torch.zeros_like(scores).scatter(-1, chosen, torch.softmax(kept / self.config.temperature, -1))
        record_routing(self, coefficients, chosen)
        out = y
        for position, (_, expert) in enumerate(experts):
            out = out + coefficients[..., position : position + 1].to(y.dtype) * expert_update(expert, x, y, host)
        return out

    @classmethod
    def num_parameters(cls, config: ArrowConfig, info: HostInfo, path: str) -> int:
        return 0

    # ---- on disk: the prototypes, so a loaded router routes exactly as the saved one did -------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"arrow_prototypes": self.prototypes(host).detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        self.prototypes(host)  # the cache key of the experts as they are now
        self.cached = (self.cached[0], tensors["arrow_prototypes"].clone())


def prototypes(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The prototypes (E_here, in) Arrow adapter `name` uses on every layer, by module path (computed if needed)."""
    found = {}
    for path, module, slot in slots_of(model):
        delta = slot._modules.get(name)
        if isinstance(delta, ArrowDelta):
            found[path] = delta.prototypes(Host(module, slot)).clone()
    if not found:
        raise DeltatuneError(f"adapter {name!r} is not an Arrow adapter")
    return found


PAPER = ("Towards Modular LLMs by Building and Reusing a Library of LoRAs (Ostapenko et al., 2024) "
         "https://arxiv.org/abs/2405.11157")
register_method("arrow", config=ArrowConfig, family="mixture", paper=PAPER, hosts=LINEAR_KINDS)(ArrowDelta)
