"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters", Bałazy et al., 2024,
https://arxiv.org/abs/2405.17604

Update rule (matrix view, W of shape out × in):  W' = W + s·B·R·A,  s = alpha / r.
B and A come from the truncated SVD of the pretrained weight, W ≈ U_r Σ_r V_rᵀ: B = U_r (out, r) and A = Σ_r V_rᵀ
(r, in) — the authors' code puts the singular values on the input side. Both are frozen; only R (r, r) trains, so
a layer has r² trainable parameters whatever its width.
Init: R ~ N(0, init_std²) with init_std = 1e-5 (the authors' code), so the start is *almost* the base model;
init_std = 0 gives an exact identity start (R still gets a gradient, Bᵀ·G·Aᵀ, because A and B are non-zero).
A and B are not saved: they are recomputed from the base weight at attach / load (`setup`). Singular vectors are
only defined up to sign, so each pair (u_i, v_i) is flipped to make the largest-magnitude entry of u_i positive
(`spectral.base_svd`); that makes the recomputed factors — and hence the meaning of a saved R — independent of the
SVD backend.
Hosts: Linear, Conv1D, Embedding and Conv (the SVD is taken of the matrix view). Forward, merge and the gathered
mixed-batch kernel come from `factored.FactoredDelta` (down = R·A, up = s·B).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, ScaledRankConfig
from .spectral import base_svd


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraXsConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    init_std: standard deviation of R's Gaussian init (the authors' code: 1e-5); 0 starts from R = 0 exactly.
    """

    init_std: float = 1e-5

    def validate(self) -> None:
        super().validate()
        if self.init_std < 0:
            raise DeltatuneError(f"{self.method}: init_std must be >= 0, got {self.init_std}; use 0 for R = 0")


class LoraXsDelta(FactoredDelta):
    """y = base(x) + s·B·R·A·x with A, B frozen from the SVD of the base weight."""

    identity_at_init = False  # R starts at N(0, 1e-5²), not 0 (init_std=0 gives an exact identity)

    def __init__(self, config: LoraXsConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config, min(info.out_features, info.fan_in))
        # Frozen and not saved: recomputed from the base weight in setup().
        self.register_buffer("lora_A", torch.zeros(self.r, info.fan_in), persistent=False)
        self.register_buffer("lora_B", torch.zeros(info.out_features, self.r), persistent=False)
        self.lora_R = nn.Parameter(torch.zeros(self.r, self.r))
        if config.init_std > 0:
            nn.init.normal_(self.lora_R, std=config.init_std)

    def setup(self, host: Host) -> None:
        u, s, vh = base_svd(self.info, host.weight(), self.lora_R.dtype)
        self.lora_B.copy_(u[:, : self.r])
        self.lora_A.copy_(s[: self.r].unsqueeze(1) * vh[: self.r])

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.lora_R @ self.lora_A, self.lora_B * self.scaling

    @classmethod
    def num_parameters(cls, config: LoraXsConfig, info: HostInfo, path: str) -> int:
        return config.r**2


PAPER = ("LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., 2024) "
         "https://arxiv.org/abs/2405.17604")
register_method("lora_xs", config=LoraXsConfig, family="low-rank", paper=PAPER)(LoraXsDelta)
