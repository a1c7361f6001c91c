"""MoE-LoRA and MoLA: a token router over several LoRA experts on each adapted layer.

- MoE-LoRA (MoLoRA): "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction
  Tuning", Zadouri et al., 2023, https://arxiv.org/abs/2309.05444 — LoRA experts mixed by a learned router; with
  top_k = None all experts are mixed by the router's softmax (the paper's soft merging), with top_k = k each token uses
  its k most probable experts. The Switch Transformer load-balancing loss (Fedus et al., 2021,
  https://arxiv.org/abs/2101.03961) keeps the router from collapsing onto a few experts (`balance_weight`).
- MoLA: "Higher Layers Need More LoRA Experts", Gao et al., 2024, https://arxiv.org/abs/2402.08562 — the same
  mixture with a different number of experts per layer (the paper's best allocation gives higher layers more experts,
  e.g. 2-4-6-8 over four groups of layers, top-2 routing).

Update rule for a token x (matrix view, W of shape out × in):
    g(x) = TopK(softmax(W_g·x)),   y = W·x + s·Σₑ gₑ(x)·Bₑ·Aₑ·x,   s = alpha / r.
Init: Aₑ Kaiming-uniform (LoRA's), Bₑ = 0 (identity at step 0), router W_g Kaiming-uniform.
Shapes: lora_A (E, r, in), lora_B (E, out, r), router (E, in); E·r·(in + out) + E·in trainable parameters per layer.
MoLA's expert count for a module: its layer index l (the number after `layers` / `h` / ... in its path) falls in group
⌊l·G / num_layers⌋ of the G = len(experts_per_group) groups; modules outside the layer stack use `default_experts`.
Not mergeable: the update depends on the input through the router. Mixed batches: grouped (each adapter on its rows).
Routing decisions: `delta.last_routing` / `deltatune.methods.mixture.routing(model, name)`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo
from ..core.registry import register_method
from ..core.targeting import layer_index
from .mixture import RoutedLowRankDelta, RoutedRankConfig, check_counts, kaiming_rows_


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeLoraConfig(RoutedRankConfig):
    """Attributes (besides RoutedRankConfig's r, alpha, dropout, top_k, renormalize, balance_weight):
    num_experts: E, the LoRA experts on every adapted layer.
    """

    num_experts: int = 4

    def validate(self) -> None:
        super().validate()
        check_counts(self.method, num_experts=self.num_experts)
        self.check_top_k(self.num_experts, "per layer")

    def experts_for(self, path: str) -> int:
        return self.num_experts


@dataclasses.dataclass(frozen=True, kw_only=True)
class MolaConfig(RoutedRankConfig):
    """Attributes (besides RoutedRankConfig's r, alpha, dropout, top_k, renormalize, balance_weight):
    experts_per_group: experts per group of consecutive layers, lowest group first (MoLA's "2-4-6-8" is [2, 4, 6, 8]).
    num_layers: layers of the model, split into len(experts_per_group) equal groups; None means one entry per layer.
    default_experts: experts for adapted modules outside the layer stack (no layer index); None makes them an error.
    """

    experts_per_group: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 6, 8])
    num_layers: int | None = None
    default_experts: int | None = None

    def validate(self) -> None:
        super().validate()
        if not self.experts_per_group:
            raise DeltatuneError("mola: experts_per_group is empty; give experts per layer group, e.g. [2, 4, 6, 8]")
        check_counts(self.method, **{f"experts_per_group[{i}]": n for i, n in enumerate(self.experts_per_group)},
                     **({} if self.default_experts is None else {"default_experts": self.default_experts}))
        layers = self.num_layers if self.num_layers is not None else len(self.experts_per_group)
        if layers < len(self.experts_per_group):
            raise DeltatuneError(f"mola: num_layers={layers} is fewer than the {len(self.experts_per_group)} groups "
                                 "of experts_per_group; give num_layers = the model's layer count")
        self.check_top_k(min(self.experts_per_group + [self.default_experts or self.experts_per_group[0]]),
                         "in the smallest group")

    def experts_for(self, path: str) -> int:
        layer = layer_index(path, self.layers_pattern)
        if layer is None:
            if self.default_experts is None:
                raise DeltatuneError(f"mola: {path!r} has no layer index to pick its expert count from; set "
                                     "default_experts or exclude it")
            return self.default_experts
        layers = self.num_layers if self.num_layers is not None else len(self.experts_per_group)
        if layer >= layers:
            raise DeltatuneError(f"mola: {path!r} is layer {layer} but num_layers={layers}; set num_layers to the "
                                 "model's layer count")
        return self.experts_per_group[layer * len(self.experts_per_group) // layers]


class MoeLoraDelta(RoutedLowRankDelta):
    """E LoRA experts (Aₑ, Bₑ) under a top-k softmax router; shared by `moe_lora` and `mola`."""

    def __init__(self, config: MoeLoraConfig | MolaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path, config.experts_for(path))
        self.lora_A = nn.Parameter(kaiming_rows_(torch.empty(self.experts, config.r, info.in_features)))

    def downs(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.lora_A.reshape(-1, self.info.in_features))  # (..., E·r)
        return h.unflatten(-1, (self.experts, self.r))

    @classmethod
    def num_parameters(cls, config: MoeLoraConfig | MolaConfig, info: HostInfo, path: str) -> int:
        experts = config.experts_for(path)
        return experts * config.r * (info.in_features + info.out_features) + experts * info.in_features


PAPER_MOLORA = ("Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning "
                "(Zadouri et al., 2023) https://arxiv.org/abs/2309.05444")
PAPER_MOLA = "Higher Layers Need More LoRA Experts (Gao et al., 2024) https://arxiv.org/abs/2402.08562"

register_method("moe_lora", config=MoeLoraConfig, family="mixture", paper=PAPER_MOLORA, hosts=LINEAR_KINDS)(
    MoeLoraDelta)
register_method("mola", config=MolaConfig, family="mixture", paper=PAPER_MOLA, hosts=LINEAR_KINDS)(MoeLoraDelta)
