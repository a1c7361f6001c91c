"""ABBA: "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models", Singhal, Ponkshe, Vartak
and Vepakomma, 2025, https://arxiv.org/abs/2505.14238

Update rule (matrix view, W of shape out × in):  W' = W + s·(B1·A1) ⊙ (B2·A2),  s = alpha² / √(r1·r2)
(the paper's rsLoRA-style scaling; with alpha = r1 = r2 = r it equals r, as in the authors' code).
The Hadamard product of a rank-r1 and a rank-r2 matrix has rank up to r1·r2, for LoRA's parameter count at
r = r1 + r2. It is computed without materialising ΔW through the Khatri-Rao identity
(B1A1) ⊙ (B2A2) = (B1 ⊙ᵣ B2)(A1 ⊙꜀ A2), a rank-r1·r2 LoRA whose factors are row-wise / column-wise products.
Init ("default", the paper's): B1·A1 is the best rank-r1 approximation of W (B1 = U√Σ, A1 = √ΣVᵀ from the
truncated SVD), A2 Kaiming-uniform, B2 = 0, so ΔW = 0 at step 0. "random": all four Kaiming-uniform (tests).
Shapes: A1 (r1, fan_in), B1 (out, r1), A2 (r2, fan_in), B2 (out, r2); fan_in = in_features (vocabulary for an
Embedding, in_channels·kernel for a convolution). Forward (convolutions: the dense Hadamard ΔW), merge and the
gathered mixed-batch kernel come from `factored.FactoredDelta` with the Khatri-Rao factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_dropout, kaiming_, split_svd


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbbaConfig(DeltaConfig):
    """Attributes:
    r1: rank of the first low-rank factor B1·A1.
    r2: rank of the second low-rank factor B2·A2 (the update has rank up to r1·r2).
    alpha: scaling numerator: s = alpha² / √(r1·r2).
    dropout: dropout probability on the adapter's input.
    init: "default" (B1·A1 = truncated SVD of W, A2 Kaiming, B2 = 0) or "random" (all Kaiming; tests).
    """

    r1: int = 4
    r2: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        super().validate()
        if self.r1 <= 0 or self.r2 <= 0:
            raise DeltatuneError(f"abba: r1 and r2 must be > 0, got r1={self.r1}, r2={self.r2}")
        check_dropout("abba", self.dropout)


def khatri_rao_factors(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(A1 ⊙꜀ A2 (r1·r2, in), B1 ⊙ᵣ B2 (out, r1·r2)): their product is (B1A1) ⊙ (B2A2)."""
    down = (a1.unsqueeze(1) * a2.unsqueeze(0)).reshape(-1, a1.shape[1])
    up = (b1.unsqueeze(2) * b2.unsqueeze(1)).reshape(b1.shape[0], -1)
    return down, up


class AbbaDelta(FactoredDelta):
    """y = base(x) + s·(B1 ⊙ᵣ B2)((A1 ⊙꜀ A2)x)."""

    def __init__(self, config: AbbaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        limit = min(info.out_features, info.fan_in)
        if config.init == "default" and config.r1 > limit:  # B1·A1 starts as the truncated SVD of W
            raise DeltatuneError(f"abba: r1={config.r1} exceeds min(out_features, fan_in)={limit} at {path!r}, the "
                                 "largest rank of W's truncated SVD; lower r1")
        self.scaling = config.alpha**2 / math.sqrt(config.r1 * config.r2)
        self.dropout = config.dropout
        self.abba_A1 = nn.Parameter(kaiming_(torch.empty(config.r1, info.fan_in)))
        self.abba_B1 = nn.Parameter(kaiming_(torch.empty(info.out_features, config.r1)))
        self.abba_A2 = nn.Parameter(kaiming_(torch.empty(config.r2, info.fan_in)))
        self.abba_B2 = nn.Parameter(kaiming_(torch.empty(info.out_features, config.r2)))
        if config.init == "default":
            nn.init.zeros_(self.abba_B2)

    def setup(self, host: Host) -> None:
        if self.config.init != "default":
            return
        down, up = split_svd(to_matrix(self.info, host.weight()), self.config.r1)
        self.abba_A1.copy_(down)
        self.abba_B1.copy_(up)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        down, up = khatri_rao_factors(self.abba_A1, self.abba_B1, self.abba_A2, self.abba_B2)
        return down, up * self.scaling

    def delta_weight(self, host: Host) -> Tensor:
        hadamard = (self.abba_B1 @ self.abba_A1) * (self.abba_B2 @ self.abba_A2)
        return from_matrix(self.info, hadamard * self.scaling)

    @classmethod
    def num_parameters(cls, config: AbbaConfig, info: HostInfo, path: str) -> int:
        return (config.r1 + config.r2) * (info.fan_in + info.out_features)


PAPER = ("ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models (Singhal et al., 2025) "
         "https://arxiv.org/abs/2505.14238")
register_method("abba", config=AbbaConfig, family="low-rank", paper=PAPER)(AbbaDelta)
