"""FLoRA (N-dimensional Tucker): "FLoRA: Low-Rank Core Space for N-dimension", Si et al., 2024,
https://arxiv.org/abs/2405.14739 (not the batched-LoRA FLoRA).

Update rule: the weight update keeps the layer's own N-dimensional shape (in, out, *kernel) and is a Tucker
product of a small core with one factor per mode,
ΔW = s · G ×₁ U_in ×₂ U_out ×₃ U_k₁ ⋯,  i.e.  ΔW[o, i, k…] = s · Σ G[a, b, c…]·U_in[i, a]·U_out[o, b]·U_k[k, c]⋯
so a convolution kernel is adapted without flattening it (its spatial modes get their own factors).
On Linear / Conv1D (N = 2) this is ΔW = s · U_out·Gᵀ·U_inᵀ, applied in factored form.
Shapes: core `flora_core` (r, r, kernel_r, …), factors `flora_in` (in, r), `flora_out` (out, r) and one
`flora_kernel.<m>` (k_m, kernel_r) per kernel mode.
Init (the reference code's): factors Kaiming-normal (a = √3), G = 0, so the model is unchanged at step 0.
Parameters: r²·kernel_rᵈ + r·(in + out) + Σ_m k_m·kernel_r (d kernel modes).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloraConfig(DeltaConfig):
    """Attributes:
    r: core rank of the input and output channel modes.
    kernel_r: core rank of each kernel mode of a convolution (the reference example uses 2).
    scale: s, multiplying the reconstructed update.
    """

    r: int = 8
    kernel_r: int = 2
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_positive("flora", r=self.r, kernel_r=self.kernel_r)


def mode_ranks(config: FloraConfig, info: HostInfo) -> list[int]:
    """Core ranks for the modes (in, out, *kernel)."""
    return [config.r, config.r] + [config.kernel_r] * len(info.kernel_size)


def tucker_product(core: Tensor, factors: list[Tensor]) -> Tensor:
    """core ×₁ factors[0] ×₂ factors[1] ⋯: each step contracts the leading rank mode and appends that mode's
    dimension, so after N steps the modes are back in order (d₀, d₁, …)."""
    full = core
    for factor in factors:  # factor: (d_m, r_m)
        full = torch.tensordot(full, factor, dims=([0], [1]))
    return full


class FloraDelta(FactoredDelta):
    """y = base(x) + s·(G ×₁ U_in ×₂ U_out ⋯) applied with the host's own op."""

    def __init__(self, config: FloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.scale = config.scale
        ranks = mode_ranks(config, info)
        self.flora_core = nn.Parameter(torch.zeros(ranks))
        self.flora_in = nn.Parameter(torch.empty(info.in_features, config.r))
        self.flora_out = nn.Parameter(torch.empty(info.out_features, config.r))
        kernel_factors = (nn.Parameter(torch.empty(k, config.kernel_r)) for k in info.kernel_size)
        self.flora_kernel = nn.ParameterList(kernel_factors)
        with torch.no_grad():
            for factor in (self.flora_in, self.flora_out, *self.flora_kernel):
                nn.init.kaiming_normal_(factor, a=math.sqrt(3))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """down = G ×₁ U_in ×₃ U_k₁ ⋯ with the output mode left open (r, in·kernel, the matrix view's columns),
        up = s·U_out (out, r); on Linear / Conv1D down = (U_in·G)ᵀ."""
        keep = torch.eye(self.config.r, dtype=self.flora_core.dtype, device=self.flora_core.device)
        full = tucker_product(self.flora_core, [self.flora_in, keep, *self.flora_kernel])  # (in, r, *kernel)
        return full.transpose(0, 1).reshape(self.config.r, -1), self.flora_out * self.scale

    @classmethod
    def num_parameters(cls, config: FloraConfig, info: HostInfo, path: str) -> int:
        dims = [info.in_features, info.out_features, *info.kernel_size]
        ranks = mode_ranks(config, info)
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))


PAPER = "FLoRA: Low-Rank Core Space for N-dimension (Si et al., 2024) https://arxiv.org/abs/2405.14739"
register_method("flora", config=FloraConfig, family="structured", paper=PAPER,
                hosts=(*LINEAR_KINDS, *CONV_KINDS))(FloraDelta)
