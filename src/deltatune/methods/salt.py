"""SALT: "SALT: Singular Value Adaptation with Low-Rank Transformation", Elsayed et al., 2025,
https://arxiv.org/abs/2503.16055

Update rule (matrix view, W = U Σ Vᵀ with k = min(out, fan_in) triplets split into the top r and the rest):
    W' = U_r diag(α ⊙ σ_r + β) V_rᵀ + U_rest (Σ_rest + X Y) V_restᵀ,
so  ΔW = U_r diag((α − 1) ⊙ σ_r + β) V_rᵀ + U_rest X Y V_restᵀ:  the dominant singular values get a trainable scale α
and shift β, and the residual singular subspace gets a rank-`lora_r` LoRA written in its own coordinates.
Init: α = 1, β = 0, X = 0, Y Kaiming-uniform (as LoRA's A), so the model is unchanged. (The reference code starts
X and Y at N(0, 0.01²) and clips the new singular-value matrix with a ReLU, which also zeroes negative entries of
X·Y; deltatune keeps the update linear in α, β and X·Y, as the paper's equation.)
Parameters: `scale` α (r,), `shift` β (r,), `lora_x` X (k − r, lora_r), `lora_y` Y (lora_r, k − r):
2r + 2(k − r)·lora_r in all. U, Σ, V are frozen buffers recomputed from the base weight (see `spectral.py`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from .spectral import SingularDelta, full_rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaltConfig(DeltaConfig):
    """Attributes:
    r: how many of the largest singular values get a trainable scale and shift.
    lora_r: rank of the LoRA update X·Y on the remaining singular subspace.
    """

    r: int = 8
    lora_r: int = 8

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.lora_r <= 0:
            raise DeltatuneError(f"salt: r and lora_r must be > 0, got r={self.r}, lora_r={self.lora_r}")


class SaltDelta(SingularDelta):
    """y = base(x) + U·[((α − 1)σ_r + β) ⊙ c_r ; X·(Y·c_rest)],  c = Vᵀx."""

    fast_parameters = ("lora_x",)

    def __init__(self, config: SaltConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        self.check_rank(self.r, limit=self.k)
        rest = self.k - self.r
        self.scale = nn.Parameter(torch.ones(self.r))
        self.shift = nn.Parameter(torch.zeros(self.r))
        self.lora_x = nn.Parameter(torch.zeros(rest, config.lora_r))
        self.lora_y = nn.Parameter(torch.empty(config.lora_r, rest))
        if rest:
            nn.init.kaiming_uniform_(self.lora_y, a=math.sqrt(5))

    def core(self, h: Tensor) -> Tensor:
        top = h[..., : self.r] * ((self.scale - 1) * self.sigma[: self.r] + self.shift)
        rest = F.linear(F.linear(h[..., self.r :], self.lora_y), self.lora_x)  # X·Y on residual coordinates
        return torch.cat([top, rest], dim=-1)

    @classmethod
    def num_parameters(cls, config: SaltConfig, info: HostInfo, path: str) -> int:
        return 2 * config.r + 2 * (full_rank(info) - config.r) * config.lora_r


PAPER = ("SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., 2025) "
         "https://arxiv.org/abs/2503.16055")
register_method("salt", config=SaltConfig, family="singular-value", paper=PAPER)(SaltDelta)
