"""EDoRA: "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition", Nasiri and
Garraghan, 2025, https://arxiv.org/abs/2501.12067

Update rule (matrix view, W0 of shape out × in, per output channel c, s = alpha / r):
    W'_c = m_c · (W0 + s·B·R·A)_c / ‖(W0 + s·B·R·A)_c‖
DoRA's magnitude / direction split, with LoRA-XS's direction update: A and B are frozen and taken from the
truncated SVD of W0 (B = U_r, A = Σ_r·V_rᵀ, the authors' split), and only the small r × r matrix R between them
and the magnitude m train: r² + out trainable parameters per layer. The norm is a constant in the backward pass
(DoRA §4.3). ΔW depends on W0, so merging keeps what it added (`uses_base_weight`).
Init: R = 0 (exactly the base model at step 0; `init_std` > 0 draws R from N(0, init_std²) instead, the authors'
code using 1e-5), m = ‖W0 + s·B·R·A‖ per output channel.
Shapes: lora_A (r, fan_in) and lora_B (out, r) frozen, lora_R (r, r), magnitude (out,); fan_in is the vocabulary
of an Embedding and in_channels·kernel of a convolution. Mixed batches run each adapter on its own rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix, per_channel, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import add_dense, check_rank_and_dropout, dropped_input, svd_factors


@dataclasses.dataclass(frozen=True, kw_only=True)
class EdoraConfig(DeltaConfig):
    """Attributes:
    r: rank of the frozen SVD factors (R is r × r).
    alpha: scaling numerator: s = alpha / r.
    dropout: dropout probability on the adapter's input.
    init_std: standard deviation of R's Gaussian init; 0 (default) starts from R = 0, the exact base model.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init_std: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout)
        if self.init_std < 0:
            raise DeltatuneError(f"edora: init_std must be >= 0, got {self.init_std}")


class EdoraDelta(Delta):
    """y = base(x) + (k − 1)·W0x + k·s·B(R(A(x))),  k = m / ‖W0 + s·BRA‖ per output channel."""

    uses_base_weight = True
    frozen_parameters = ("lora_A", "lora_B")

    def __init__(self, config: EdoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        self.check_rank(self.r, min(info.out_features, info.fan_in))
        self.scaling = config.alpha / config.r
        self.dropout = config.dropout
        self.lora_A = nn.Parameter(torch.zeros(self.r, info.fan_in))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, self.r))
        self.lora_R = nn.Parameter(torch.randn(self.r, self.r) * config.init_std)
        self.magnitude = nn.Parameter(torch.ones(info.out_features))

    def setup(self, host: Host) -> None:
        u, s, vh = svd_factors(to_matrix(self.info, host.weight()), self.r)
        self.lora_B.copy_(u)
        self.lora_A.copy_(s.unsqueeze(1) * vh)
        self.magnitude.copy_(self.direction(host).norm(dim=1))

    def direction(self, host: Host) -> Tensor:
        """V = W0 + s·B·R·A (matrix view)."""
        base = to_matrix(self.info, host.weight()).to(self.lora_R.dtype)
        return base + self.lora_B @ self.lora_R @ self.lora_A * self.scaling

    def rescale(self, direction: Tensor) -> Tensor:
        """k = m / ‖V‖ per output channel, the norm detached from the graph."""
        return self.magnitude / direction.norm(dim=1).detach()

    def delta_weight(self, host: Host) -> Tensor:
        direction = self.direction(host)
        base = to_matrix(self.info, host.weight()).to(direction.dtype)
        return from_matrix(self.info, (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction - base)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        direction = self.direction(host)
        if self.info.kind not in LINEAR_KINDS:
            base = to_matrix(self.info, host.weight()).to(direction.dtype)
            delta = from_matrix(self.info, self.rescale(direction).unsqueeze(1) * direction - base)
            return add_dense(dropped_input(self, x), y, host, delta)
        x_in = dropped_input(self, x)
        # With dropout the base term uses the dropped input too, as DoRA does.
        base_out = host.base_output(x) if x_in is x else host.apply(x_in, host.weight())
        low = F.linear(F.linear(F.linear(x_in.to(self.lora_A.dtype), self.lora_A), self.lora_R), self.lora_B)
        k = per_channel(self.info, self.rescale(direction), y.ndim)
        return y + ((k - 1) * base_out.to(low.dtype) + k * low * self.scaling).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: EdoraConfig, info: HostInfo, path: str) -> int:
        return config.r * config.r + info.out_features


PAPER = ("EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition (Nasiri and "
         "Garraghan, 2025) https://arxiv.org/abs/2501.12067")
register_method("edora", config=EdoraConfig, family="low-rank", paper=PAPER)(EdoraDelta)
