"""HydraLoRA: "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning", Tian et al., 2024 (NeurIPS),
https://arxiv.org/abs/2404.19245

An asymmetric LoRA: one down-projection A shared by every expert (it converges to common knowledge), N up-projections
Bᵢ (the "heads", which specialise), and a router that weighs the heads per token:
    ω(x) = softmax(W_g·x),   y = W·x + s·Σᵢ ωᵢ(x)·Bᵢ·A·x,   s = alpha / r.
The paper mixes all heads (top_k = None, the default here); top_k = k keeps each token's k best heads, and
`balance_weight` adds the Switch load-balancing loss (off by default: the paper trains with the task loss only).
Init: A Kaiming-uniform, Bᵢ = 0 (identity at step 0), W_g Kaiming-uniform.
Shapes: lora_A (r, in), lora_B (N, out, r), router (N, in); r·in + N·r·out + N·in trainable parameters per layer.
Not mergeable (the head weights depend on the input). Mixed batches: grouped. Routing decisions: `last_routing`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.hosts import LINEAR_KINDS, HostInfo
from ..core.registry import register_method
from .mixture import RoutedLowRankDelta, RoutedRankConfig, check_counts, kaiming_rows_


@dataclasses.dataclass(frozen=True, kw_only=True)
class HydraLoraConfig(RoutedRankConfig):
    """Attributes (besides RoutedRankConfig's r, alpha, dropout, renormalize):
    num_heads: N, the B matrices (experts) sharing one A.
    top_k: heads each token uses; None mixes all heads (the paper).
    balance_weight: α of the Switch load-balancing loss (0: off, the paper).
    """

    num_heads: int = 3
    top_k: int | None = None
    balance_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_counts(self.method, num_heads=self.num_heads)
        self.check_top_k(self.num_heads, "(num_heads)")


class HydraLoraDelta(RoutedLowRankDelta):
    """Shared A, N routed B heads."""

    def __init__(self, config: HydraLoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path, config.num_heads)
        self.lora_A = nn.Parameter(kaiming_rows_(torch.empty(config.r, info.in_features)))

    def downs(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.lora_A)  # (..., r), the same for every head
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.experts, self.r)

    @classmethod
    def num_parameters(cls, config: HydraLoraConfig, info: HostInfo, path: str) -> int:
        n, r = config.num_heads, config.r
        return r * info.in_features + n * r * info.out_features + n * info.in_features


PAPER = ("HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., 2024) "
         "https://arxiv.org/abs/2404.19245")
register_method("hydralora", config=HydraLoraConfig, family="mixture", paper=PAPER, hosts=LINEAR_KINDS)(HydraLoraDelta)
