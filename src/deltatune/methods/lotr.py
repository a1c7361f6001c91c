"""LoTR: "LoTR: Low Tensor Rank Weight Adaptation", Bershatsky et al., 2024, https://arxiv.org/abs/2402.01376

Update rule (matrix view): the updates of a group of same-shaped layers form a 3-way tensor with a Tucker-2
decomposition, so layer l of the group gets  ΔW_l = s · L · G_l · R,  s = alpha / r,
with L (out, r) and R (r, fan_in) shared by the whole group and trained once, and a small core G_l (r, r) per
layer whose size does not depend on the layer width.
Groups: layers of the same matrix shape (`share_by="shape"`), or of the same module name and shape
(`share_by="name"`: every q_proj together, every v_proj together, as in the paper's experiments).
Init (the reference code's): L, R ~ N(0, 1), G_l = 0, so the model is unchanged at step 0.
Parameters: Σ_l r² (`num_parameters`, per layer) + Σ_groups r·(out + fan_in) (`num_shared_parameters`).
L and R live in the adapter-wide shared module (`make_shared`), saved once as `deltatune_shared.lhs.<group>` /
`deltatune_shared.rhs.<group>`; each layer saves its core as `lotr_core`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hosts import WEIGHT_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class LotrConfig(DeltaConfig):
    """Attributes:
    r: Tucker rank of the shared factors and of each core.
    alpha: scaling numerator, s = alpha / r (the reference code's `scale`).
    share_by: "shape" (one L, R per matrix shape) or "name" (per module name and shape).
    """

    r: int = 8
    alpha: float = 1.0
    share_by: Literal["shape", "name"] = "shape"

    def validate(self) -> None:
        super().validate()
        check_positive("lotr", r=self.r)


def group_of(config: LotrConfig, info: HostInfo, path: str) -> str:
    """The sharing group of a layer, used as the key of its shared factors."""
    shape = f"{info.out_features}x{info.fan_in}"
    return shape if config.share_by == "shape" else f"{path.rsplit('.', 1)[-1]}_{shape}"


class LotrDelta(FactoredDelta):
    """y = base(x) + s·L(G(R·x)), L and R shared across the layer's group."""

    def __init__(self, config: LotrConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r, min(info.out_features, info.fan_in))
        self.group = group_of(config, info, path)
        self.scaling = config.alpha / config.r
        self.lotr_core = nn.Parameter(torch.zeros(config.r, config.r))

    @classmethod
    def make_shared(cls, config: LotrConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        shared = nn.Module()
        shared.lhs, shared.rhs = nn.ParameterDict(), nn.ParameterDict()
        for path, info in hosts.items():
            key = group_of(config, info, path)
            if key not in shared.lhs:
                shared.lhs[key] = nn.Parameter(torch.randn(info.out_features, config.r))
                shared.rhs[key] = nn.Parameter(torch.randn(config.r, info.fan_in))
        return shared

    def shared_factors(self) -> tuple[Tensor, Tensor]:
        """The group's shared L (out, r) and R (r, fan_in)."""
        return self.shared.lhs[self.group], self.shared.rhs[self.group]

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        lhs, rhs = self.shared_factors()
        return self.lotr_core @ rhs, lhs * self.scaling

    @classmethod
    def num_parameters(cls, config: LotrConfig, info: HostInfo, path: str) -> int:
        """The layer's own core G_l: r²."""
        return config.r * config.r

    @classmethod
    def num_shared_parameters(cls, config: LotrConfig, hosts: dict[str, HostInfo]) -> int:
        """One L (out, r) and R (r, fan_in) per group."""
        groups = {group_of(config, info, path): info for path, info in hosts.items()}
        return sum(config.r * (info.out_features + info.fan_in) for info in groups.values())


PAPER = "LoTR: Low Tensor Rank Weight Adaptation (Bershatsky et al., 2024) https://arxiv.org/abs/2402.01376"
register_method("lotr", config=LotrConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS)(LotrDelta)
