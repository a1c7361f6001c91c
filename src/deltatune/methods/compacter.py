"""Compacter and Compacter++: "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", Karimi Mahabadi et al.,
2021, https://arxiv.org/abs/2106.04647

A bottleneck adapter h + σ(h·W_downᵀ + b_down)·W_upᵀ + b_up whose projections are low-rank parameterised
hypercomplex multiplication (LPHM) layers:
    W = Σᵢ₌₁ⁿ Aᵢ ⊗ Bᵢ,   Bᵢ = sᵢ·tᵢᵀ,
with the "slow" rule matrices Aᵢ (n × n) shared by every Compacter layer of the adapter (both projections of every
adapted layer) and the "fast" rank-one factors sᵢ, tᵢ per projection. A width that n does not divide is covered by
⌈width / n⌉-sized blocks and the Kronecker sum is cropped to the layer's shape.
Compacter sits after the attention and the feed-forward blocks (Houlsby's placement), Compacter++ after the
feed-forward block only. Init: Aᵢ ~ N(0, 1/n); the down projection's sᵢ ~ N(0, 1), tᵢ ~ N(0, 1/d) (so W_down's
entries have variance 1/d); the up projection's sᵢ = 0 (the model is unchanged at step 0), tᵢ ~ N(0, 1/r).
Parameters per layer: n·(⌈r/n⌉ + ⌈d/n⌉) + r for the down projection, n·(⌈d/n⌉ + ⌈r/n⌉) + d for the up one; n³ once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from .bottleneck import SEQUENTIAL_HOSTS, BottleneckConfig, Placement, SequentialBottleneckDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompacterConfig(BottleneckConfig):
    """Attributes (besides BottleneckConfig's):
    n: number of Kronecker summands (the hypercomplex dimension); Aᵢ are n × n.
    """

    n: int = 4
    reduction_factor: float = 32.0
    activation: Literal["relu", "gelu", "swish", "tanh"] = "gelu"
    placement: Placement = "both"

    def validate(self) -> None:
        super().validate()
        if self.n <= 0:
            raise DeltatuneError(f"{self.method}: n must be > 0, got {self.n}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: only after the feed-forward block."""

    placement: Placement = "ffn"


def blocks(width: int, n: int) -> int:
    return math.ceil(width / n)


def phm_weight(rule: Tensor, left: Tensor, right: Tensor, shape: tuple[int, int]) -> Tensor:
    """Σᵢ Aᵢ ⊗ (leftᵢ·rightᵢᵀ) cropped to `shape`. rule (n, n, n), left (n, p), right (n, q)."""
    n, p, q = rule.shape[0], left.shape[1], right.shape[1]
    factors = left.unsqueeze(2) * right.unsqueeze(1)  # (n, p, q): the rank-one Bᵢ
    full = torch.einsum("iab,icd->acbd", rule, factors).reshape(n * p, n * q)
    return full[: shape[0], : shape[1]]


class CompacterDelta(SequentialBottleneckDelta):
    """A sequential bottleneck adapter with LPHM projections."""

    fast_parameters = ("up_left", "up_bias")

    def make_parameters(self, config: CompacterConfig) -> None:
        n, r = config.n, self.r
        self.down_left = nn.Parameter(torch.randn(n, blocks(r, n)))
        self.down_right = nn.Parameter(torch.randn(n, blocks(self.d_in, n)) / math.sqrt(self.d_in))
        self.down_bias = nn.Parameter(torch.zeros(r))
        up_scale = 1e-2 if config.init == "houlsby" else 0.0
        self.up_left = nn.Parameter(torch.randn(n, blocks(self.d_out, n)) * up_scale)
        self.up_right = nn.Parameter(torch.randn(n, blocks(r, n)) / math.sqrt(r))
        self.up_bias = nn.Parameter(torch.zeros(self.d_out))

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rule = self.shared.rule
        down = phm_weight(rule, self.down_left, self.down_right, (self.r, self.d_in))
        up = phm_weight(rule, self.up_left, self.up_right, (self.d_out, self.r))
        return down, self.down_bias, up, self.up_bias

    @classmethod
    def make_shared(cls, config: CompacterConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        shared = nn.Module()
        shared.rule = nn.Parameter(torch.randn(config.n, config.n, config.n) / math.sqrt(config.n))
        return shared

    @classmethod
    def num_parameters(cls, config: CompacterConfig, info: HostInfo, path: str) -> int:
        d_in, d_out = cls.widths(info)
        r, n = config.bottleneck_for(d_out), config.n
        return n * (blocks(r, n) + blocks(d_in, n)) + r + n * (blocks(d_out, n) + blocks(r, n)) + d_out

    @classmethod
    def num_shared_parameters(cls, config: CompacterConfig, hosts: dict[str, HostInfo]) -> int:
        return config.n**3


PAPER = ("Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Karimi Mahabadi et al., 2021) "
         "https://arxiv.org/abs/2106.04647")
register_method("compacter", config=CompacterConfig, family="bottleneck", paper=PAPER,
                hosts=SEQUENTIAL_HOSTS)(CompacterDelta)
register_method("compacter_pp", config=CompacterPlusPlusConfig, family="bottleneck", paper=PAPER,
                hosts=SEQUENTIAL_HOSTS)(CompacterDelta)
