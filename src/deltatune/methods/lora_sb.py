"""LoRA-SB: "Initialization Using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
Fine-Tuning", Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557

Update rule (matrix view):  W' = W + s·B·(R − R₀)·A,  s = alpha / r, with B (out, r) and A (r, in) frozen and only
R (r, r) trained — LoRA-XS's architecture. The paper's initialisation approximates the first full fine-tuning
update: −G = U·S·Vᵀ, B = U_r, A = V_rᵀ, R₀ = diag(S_r / S₁) / s; the first gradient step on R then moves W along
the best rank-r approximation of the full step. The paper subtracts s·B·R₀·A from the base weight; here the frozen
R₀ is subtracted instead, so the model is unchanged at step 0.
Inits: "svd" (data-free: B, A = the top singular vectors of W, R = R₀ = 0) or "gradient", which
`deltatune.algorithms.inits.initialize(model, adapter, "lora_sb", batches)` computes from data.
Saved tensors: lora_sb_A, lora_sb_B (the frozen bases), lora_R and lora_R0.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.hosts import HostInfo, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, ScaledRankConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSbConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    init: "svd" (bases from the base weight) or "gradient" (set by deltatune.algorithms.inits.initialize).
    """

    init: Literal["svd", "gradient"] = "svd"


class LoraSbDelta(FactoredDelta):
    """y = base(x) + s·B·(R − R₀)·A·x with B, A and R₀ frozen."""

    def __init__(self, config: LoraSbConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config, min(info.out_features, info.fan_in))
        self.register_buffer("lora_sb_A", torch.zeros(self.r, info.fan_in))
        self.register_buffer("lora_sb_B", torch.zeros(info.out_features, self.r))
        self.register_buffer("lora_R0", torch.zeros(self.r, self.r))
        self.lora_R = nn.Parameter(torch.zeros(self.r, self.r))

    def setup(self, host: Host) -> None:
        u, _, vh = torch.linalg.svd(to_matrix(self.info, host.weight()).float(), full_matrices=False)
        self.lora_sb_B.copy_(u[:, : self.r])
        self.lora_sb_A.copy_(vh[: self.r])

    def set_start(self, u: Tensor, s: Tensor, vh: Tensor) -> None:
        """The gradient init: B = U_r, A = V_rᵀ, R = R₀ = diag(S_r / S₁) / s."""
        with torch.no_grad():
            self.lora_sb_B.copy_(u)
            self.lora_sb_A.copy_(vh)
            self.lora_R0.copy_(torch.diag(s) / self.scaling)
            self.lora_R.copy_(self.lora_R0)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return (self.lora_R - self.lora_R0) @ self.lora_sb_A, self.lora_sb_B * self.scaling

    @classmethod
    def num_parameters(cls, config: LoraSbConfig, info: HostInfo, path: str) -> int:
        return config.r**2


PAPER = ("Initialization Using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning "
         "(Ponkshe et al., 2024) https://arxiv.org/abs/2411.19557")
register_method("lora_sb", config=LoraSbConfig, family="low-rank", paper=PAPER)(LoraSbDelta)
