"""SingLoRA: "SingLoRA: Low Rank Adaptation Using a Single Matrix", Bensaïd et al., 2025,
https://arxiv.org/abs/2507.05566

Update rule (matrix view, W of shape out × in):
    W' = W + (alpha / r)·u(t)·A[:out]·A[:in]ᵀ,   A ∈ R^{max(out, in) × r},   u(t) = min(t / T, 1).
For a square layer this is the paper's symmetric update A·Aᵀ. For a non-square layer the paper's truncation rule
applies: A has as many rows as the larger side, and the smaller side uses A*, the first rows of A.
Init: A Kaiming-uniform with LoRA's A law (bound 1/√max(out, in)). The model starts unchanged because u(0) = 0
(one single matrix cannot start at zero: A = 0 would get no gradient).
The step t counts training forwards (grad enabled, train mode) of each delta; it is saved with the adapter so a
reloaded adapter keeps its ramp position. With gradient accumulation or activation recomputation t advances once per
forward call, so set `ramp_steps` in forwards. `ramp_steps = 0` disables the ramp (u ≡ 1).
Shapes: A (max(out, fan_in), r) in the matrix view (ConvNd: fan_in = in·kernel). Trainable parameters:
r·max(out, fan_in).

`identity_at_init` is False on the class because `ramp_steps = 0` starts from a non-zero update; with the default
ramp the first forward is exactly the base model (tested in tests/methods/test_singlora.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive, kaiming_rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class SingloraConfig(DeltaConfig):
    """Attributes:
    r: rank of the single matrix A.
    alpha: scaling numerator (s = alpha / r).
    ramp_steps: T of the ramp u(t) = min(t / T, 1), in training forwards; 0 turns the ramp off (u ≡ 1).
    """

    r: int = 8
    alpha: float = 8.0
    ramp_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        check_positive("singlora", r=self.r)
        if self.ramp_steps < 0:
            raise DeltatuneError(
                f"singlora: ramp_steps must be >= 0 (0 disables the ramp), got {self.ramp_steps}")


class SingloraDelta(FactoredDelta):
    """ΔW = s·u(t)·A[:out]·A[:in]ᵀ: down = A[:fan_in]ᵀ, up = s·u(t)·A[:out]."""

    identity_at_init = False
    gather_while_training = False  # forward advances the ramp step; the grouped path calls forward

    def __init__(self, config: SingloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r)
        side = max(info.out_features, info.fan_in)
        self.A = nn.Parameter(kaiming_rows((config.r, side)).t().contiguous())  # (side, r)
        self.register_buffer("ramp_step", torch.zeros((), dtype=torch.long))
        self.scaling = config.alpha / config.r

    def ramp(self) -> Tensor:
        """u(t) = min(t / T, 1) as a 0-dim tensor (no host sync)."""
        if self.config.ramp_steps == 0:
            return torch.ones((), dtype=self.A.dtype, device=self.A.device)
        return (self.ramp_step.to(self.A.dtype) / self.config.ramp_steps).clamp(max=1.0)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        down = self.A[: self.info.fan_in].t()  # (r, fan_in)
        up = self.A[: self.info.out_features] * (self.scaling * self.ramp())  # (out, r)
        return down, up

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        out = super().forward(x, y, host)
        if self.training and torch.is_grad_enabled():
            self.ramp_step += 1
        return out

    @classmethod
    def num_parameters(cls, config: SingloraConfig, info: HostInfo, path: str) -> int:
        return config.r * max(info.out_features, info.fan_in)


PAPER = "SingLoRA: Low Rank Adaptation Using a Single Matrix (Bensaïd et al., 2025) https://arxiv.org/abs/2507.05566"
register_method("singlora", config=SingloraConfig, family="low-rank", paper=PAPER)(SingloraDelta)
