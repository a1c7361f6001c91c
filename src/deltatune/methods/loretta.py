"""LoRETTA_rep (tensor-train LoRA): "LoRETTA: Low-Rank Economic Tensor-Train Adaptation for
Ultra-Low-Parameter Fine-Tuning of Large Language Models", Yang et al., 2024, https://arxiv.org/abs/2402.11417

Update rule (matrix view):  ΔW = s · B · A,  s = alpha / r,  where the LoRA factors A (r, fan_in) and
B (out, r) are each stored as a tensor train: the matrix is reshaped to a tensor with modes n_1..n_d (the
factors of its rows, then of its columns) and T[i_1, …, i_d] = G_1[:, i_1, :] · G_2[:, i_2, :] ⋯
G_d[:, i_d, :], with cores G_k (t_{k-1}, n_k, t_k), t_0 = t_d = 1 and the other TT ranks t_k = `tt_rank`.
Each dimension is split into factors near `mode_size` (576 -> 8·8·9), so the parameter count
Σ_k t_{k-1}·n_k·t_k grows with the logarithm of the width instead of linearly.
Init: cores ~ N(0, 1)/√t_k · (1/√(rows + cols))^(1/d) (the reference code's), then B's last core is zeroed
so ΔW = 0 at step 0 (LoRA's convention); init "gaussian" keeps every core random as the reference code does.
Parameters: `a_cores.<k>` and `b_cores.<k>`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import WEIGHT_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class LorettaConfig(DeltaConfig):
    """Attributes:
    r: rank of the LoRA product B·A.
    alpha: scaling numerator, s = alpha / r.
    tt_rank: the inner tensor-train ranks t_1..t_{d-1} of both factors.
    mode_size: target size of each tensor mode when a dimension is factored.
    init: "lora" (B's last core zero: identity at init) or "gaussian" (every core random, as the reference
        code).
    """

    r: int = 8
    alpha: float = 8.0
    tt_rank: int = 5
    mode_size: int = 8
    init: Literal["lora", "gaussian"] = "lora"

    def validate(self) -> None:
        super().validate()
        check_positive("loretta", r=self.r, tt_rank=self.tt_rank)
        if self.mode_size < 2:
            raise DeltatuneError(f"loretta: mode_size must be >= 2, got {self.mode_size}")


def tt_modes(n: int, mode_size: int) -> list[int]:
    """Factor n into modes, each the divisor of what remains that is nearest `mode_size` (smaller on ties)."""
    modes = []
    while n > 1:
        pick = min((d for d in range(2, n + 1) if n % d == 0), key=lambda d: (abs(d - mode_size), d))
        modes.append(pick)
        n //= pick
    return modes or [1]


def tt_core_shapes(rows: int, cols: int, config: LorettaConfig) -> list[tuple[int, int, int]]:
    """(t_{k-1}, n_k, t_k) for the tensor train of a rows × cols matrix."""
    modes = tt_modes(rows, config.mode_size) + tt_modes(cols, config.mode_size)
    ranks = [1] + [config.tt_rank] * (len(modes) - 1) + [1]
    return [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(modes)]


def tt_matrix(cores: nn.ParameterList, rows: int, cols: int) -> Tensor:
    """Contract the cores left to right into the (rows, cols) matrix they represent."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    return full.reshape(rows, cols)


def tt_cores(rows: int, cols: int, config: LorettaConfig) -> nn.ParameterList:
    shapes = tt_core_shapes(rows, cols, config)
    spread = (1.0 / math.sqrt(rows + cols)) ** (1.0 / len(shapes))
    return nn.ParameterList(nn.Parameter(torch.randn(s) / math.sqrt(s[2]) * spread) for s in shapes)


class LorettaDelta(FactoredDelta):
    """y = base(x) + s·B(A·x), A and B rebuilt from their tensor-train cores."""

    def __init__(self, config: LorettaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        self.check_rank(self.r)
        self.scaling = config.alpha / config.r
        self.a_cores = tt_cores(config.r, info.fan_in, config)
        self.b_cores = tt_cores(info.out_features, config.r, config)
        if config.init == "lora":
            with torch.no_grad():
                self.b_cores[-1].zero_()

    def tt_factors(self) -> tuple[Tensor, Tensor]:
        """A (r, fan_in) and B (out, r), unscaled."""
        return (tt_matrix(self.a_cores, self.r, self.info.fan_in),
                tt_matrix(self.b_cores, self.info.out_features, self.r))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        down, up = self.tt_factors()
        return down, up * self.scaling

    @classmethod
    def identity_for(cls, config: LorettaConfig) -> bool:
        return config.init == "lora"

    @classmethod
    def num_parameters(cls, config: LorettaConfig, info: HostInfo, path: str) -> int:
        down = tt_core_shapes(config.r, info.fan_in, config)
        up = tt_core_shapes(info.out_features, config.r, config)
        return sum(t_in * n * t_out for t_in, n, t_out in down + up)  # Σ_k t_{k-1}·n_k·t_k


PAPER = ("LoRETTA: Low-Rank Economic Tensor-Train Adaptation for Ultra-Low-Parameter Fine-Tuning of Large "
         "Language Models (Yang et al., 2024) https://arxiv.org/abs/2402.11417")
register_method("loretta", config=LorettaConfig, family="structured", paper=PAPER,
                hosts=WEIGHT_KINDS)(LorettaDelta)
