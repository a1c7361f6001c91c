"""Spectral Adapter (additive): "Spectral Adapter: Fine-Tuning in Spectral Space", Zhang & Pilanci, 2024,
https://arxiv.org/abs/2405.13952

Update rule (matrix view, W = U Σ Vᵀ; the top r triplets U_r, Σ_r, V_r are tuned, the rest W_rest stays):
    W' = (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ + W_rest,
so  ΔW = ΔU Σ_r (V_r + ΔV)ᵀ + U_r Σ_r ΔVᵀ  (rank ≤ 2r; W' − W_rest has rank ≤ r).
Init: ΔU = 0, ΔV = 0 (as the reference code), so the model is unchanged; the gradients at zero, G V_r Σ_r and
Gᵀ U_r Σ_r, are not zero, so both start training. (The paper's rotational variant is not implemented here.)
Parameters: `delta_u` ΔU (out, r), `delta_v` ΔV (fan_in, r): r·(out + fan_in). U_r, Σ_r, V_r are frozen buffers
recomputed from the base weight (see `spectral.py`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from .spectral import SingularDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralAdapterConfig(DeltaConfig):
    """Attributes:
    r: how many of the top singular vector pairs are tuned.
    """

    r: int = 4

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise DeltatuneError(f"spectral_adapter: r must be > 0, got r={self.r}")


class SpectralAdapterDelta(SingularDelta):
    """y = base(x) + ΔU·(Σ_r ⊙ (V_r + ΔV)ᵀx) + U_r·(Σ_r ⊙ ΔVᵀx)."""

    def __init__(self, config: SpectralAdapterConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        self.check_rank(self.r, limit=self.k)
        self.delta_u = nn.Parameter(torch.zeros(info.out_features, self.r))
        self.delta_v = nn.Parameter(torch.zeros(info.fan_in, self.r))

    def kept(self) -> slice:
        return slice(0, self.r)

    def update(self, x: Tensor) -> Tensor:
        p = self.project(x, self.vh)  # V_rᵀx (..., r)
        q = self.project(x, self.delta_v.t())  # ΔVᵀx (..., r)
        return F.linear((p + q) * self.sigma, self.delta_u) + F.linear(q * self.sigma, self.u)

    def delta_matrix(self) -> Tensor:
        return (self.delta_u * self.sigma) @ (self.vh + self.delta_v.t()) + (self.u * self.sigma) @ self.delta_v.t()

    @classmethod
    def num_parameters(cls, config: SpectralAdapterConfig, info: HostInfo, path: str) -> int:
        return config.r * (info.out_features + info.fan_in)


PAPER = "Spectral Adapter: Fine-Tuning in Spectral Space (Zhang & Pilanci, 2024) https://arxiv.org/abs/2405.13952"
register_method("spectral_adapter", config=SpectralAdapterConfig, family="singular-value", paper=PAPER)(
    SpectralAdapterDelta
)
