"""NoRA: "NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models", Lin et al., 2024,
https://arxiv.org/abs/2408.10280

Two nested LoRAs (matrix view, W of shape out × in): an outer pair initialised from the top-r singular triplets of
the base weight and frozen, and an inner pair of rank r' < r between them that trains:
    ΔW = s·B_out·(B_in·A_in)·A_out,   s = alpha / r'.
Init: W = U·S·Vᵀ; B_out = U_r·√S_r (out × r), A_out = √S_r·V_rᵀ (r × in), so B_out·A_out is W's best rank-r
approximation (the "pre-trained weight inheritance" of the paper); the inner pair follows LoRA's init — A_in
Kaiming-uniform, B_in = 0 — so the model is unchanged at step 0.
The outer factors are frozen buffers that are *saved* with the adapter: singular vectors are defined only up to
sign, so recomputing them on another machine could pair the trained inner factors with flipped outer ones.
Shapes: A_out (r, fan_in), B_out (out, r), A_in (r', r), B_in (r, r'); trainable parameters 2·r·r'.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, kaiming_rows, split_svd


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoraConfig(DeltaConfig):
    """Attributes:
    r: rank of the frozen outer LoRA (top-r singular triplets of W); at most min(out, in).
    inner_r: rank r' of the trainable inner LoRA; at most r.
    alpha: scaling numerator (s = alpha / inner_r).
    """

    r: int = 16
    inner_r: int = 4
    alpha: float = 4.0

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or not 0 < self.inner_r <= self.r:
            raise DeltatuneError(
                f"nora: need r > 0 and 0 < inner_r <= r, got r={self.r}, inner_r={self.inner_r}; lower inner_r")


class NoraDelta(FactoredDelta):
    """ΔW = s·B_out·B_in·A_in·A_out: down = A_in·A_out, up = s·B_out·B_in."""

    fast_parameters = ("inner_B",)

    def __init__(self, config: NoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        r, inner = config.r, config.inner_r
        self.check_rank(r, min(info.out_features, info.fan_in))
        self.register_buffer("outer_A", torch.zeros(r, info.fan_in))
        self.register_buffer("outer_B", torch.zeros(info.out_features, r))
        self.inner_A = nn.Parameter(kaiming_rows((inner, r)))
        self.inner_B = nn.Parameter(torch.zeros(r, inner))
        self.scaling = config.alpha / inner

    def setup(self, host: Host) -> None:
        down, up = split_svd(to_matrix(self.info, host.weight()).detach(), self.config.r)
        self.outer_A.copy_(down)
        self.outer_B.copy_(up)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.inner_A @ self.outer_A, (self.outer_B @ self.inner_B) * self.scaling

    @classmethod
    def num_parameters(cls, config: NoraConfig, info: HostInfo, path: str) -> int:
        return 2 * config.r * config.inner_r


PAPER = "NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models (Lin et al., 2024) https://arxiv.org/abs/2408.10280"
register_method("nora", config=NoraConfig, family="low-rank", paper=PAPER)(NoraDelta)
