"""Full fine-tuning of chosen modules, written as a dense delta (the reference point of delta tuning).

"Delta Tuning: A Comprehensive Study of Parameter Efficient Methods for Pre-trained Language Models" (Ding et al.,
2022), https://arxiv.org/abs/2203.06904, frames every method as a structured ΔW; this is the unstructured one.
Update rule: W' = W + ΔW, b' = b + Δb, with ΔW a full trainable tensor of the host weight's shape.
Init: ΔW = 0, Δb = 0 (the model is unchanged at step 0).
Uses: a new classification head (whose base is zero), embeddings of added tokens, or the "full" row of a comparison
— trained, saved, merged and routed per row like any other delta.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hosts import ALL_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig(DeltaConfig):
    """Attributes:
    train_bias: also train a bias update where the host has a bias.
    """

    train_bias: bool = True


class FullDelta(Delta):
    """y = host(x; W + ΔW) (+ Δb)."""

    def __init__(self, config: FullConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.weight_delta = nn.Parameter(torch.zeros(info.weight_shape))
        has_bias = config.train_bias and info.has_bias
        self.bias_delta = nn.Parameter(torch.zeros(info.out_features)) if has_bias else None

    def delta_weight(self, host: Host) -> Tensor:
        return self.weight_delta

    def delta_bias(self, host: Host) -> Tensor | None:
        return self.bias_delta

    @classmethod
    def num_parameters(cls, config: FullConfig, info: HostInfo, path: str) -> int:
        count = 1
        for size in info.weight_shape:
            count *= size
        return count + (info.out_features if config.train_bias and info.has_bias else 0)


PAPER = ("Delta Tuning: A Comprehensive Study of Parameter Efficient Methods for Pre-trained Language Models "
         "(Ding et al., 2022) https://arxiv.org/abs/2203.06904")
register_method("full", config=FullConfig, family="full", paper=PAPER, hosts=ALL_KINDS)(FullDelta)
