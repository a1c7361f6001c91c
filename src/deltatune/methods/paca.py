"""PaCA: Partial Connection Adaptation — fine-tune a random subset of a weight's columns in place.

"PaCA: Partial Connection Adaptation for Efficient Fine-Tuning", Woo et al., 2025, https://arxiv.org/abs/2503.01905

Update rule (matrix view W of shape out × fan_in, column set P of size r drawn at random):
    W'[:, P] = W[:, P] + s·D,  W'[:, j] = W[:, j] for j ∉ P,  s = alpha / r.
No adapter path: the output is y + s·D·x[P], only the r selected input features enter the update (and its
gradient), which is where PaCA saves activation memory. The official code keeps the absolute columns W[:, P] / s
as the trained tensor; training D = that − W[:, P] / s from 0 is the same optimisation.
Init: D = 0, so the model is unchanged at step 0.
Shapes: D (out, r) saved as `paca_delta`; column indices P (r,) int64 saved as `paca_indices` (drawn with
torch.randperm from a generator seeded by `seed` and the module path). For convolutions a "column" is one
(input channel, kernel position) entry of the matrix view; for embeddings, one token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import gather_rows
from .sparse_ft import path_generator


@dataclasses.dataclass(frozen=True, kw_only=True)
class PacaConfig(DeltaConfig):
    """Attributes:
    r: number of columns (input connections) of each weight that train.
    alpha: scaling numerator, s = alpha / r (as LoRA's).
    seed: seed of the random column selection.
    """

    r: int = 8
    alpha: float = 8.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise DeltatuneError(f"paca: r must be > 0, got {self.r}")


class PacaDelta(Delta):
    """y = base(x) + s·D·x[P]."""

    def __init__(self, config: PacaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        if self.r > info.fan_in:
            raise DeltatuneError(f"paca: r={self.r} exceeds the {info.fan_in} columns of {path!r}; lower r")
        self.scaling = config.alpha / config.r
        self.paca_delta = nn.Parameter(torch.zeros(info.out_features, self.r))
        columns = torch.randperm(info.fan_in, generator=path_generator(config.seed, path))[: self.r]
        self.register_buffer("paca_indices", columns.sort().values)

    def delta_matrix(self) -> Tensor:
        """ΔW in the matrix view (out, fan_in): s·D in the columns P, zero elsewhere."""
        matrix = self.paca_delta.new_zeros(self.info.out_features, self.info.fan_in)
        return matrix.index_copy(1, self.paca_indices, self.paca_delta * self.scaling)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS:
            return super().forward(x, y, host)  # embeddings, convolutions: the host's op with the dense ΔW
        picked = x.index_select(-1, self.paca_indices).to(self.paca_delta.dtype)  # (..., r)
        return y + (F.linear(picked, self.paca_delta) * self.scaling).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.delta_matrix())

    @classmethod
    def num_parameters(cls, config: PacaConfig, info: HostInfo, path: str) -> int:
        return info.out_features * config.r

    # ---- mixed batches (Linear / Conv1D): each row gathers its adapter's columns, one bmm -----------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if host.info.kind not in LINEAR_KINDS:
            return super().per_row(deltas, slots, x, y, host, cache)
        r_max = max(d.r for d in deltas)
        # Padded columns point at input 0 with a zero weight; rows without adapter get all zeros.
        columns = gather_rows([F.pad(d.paca_indices, (0, r_max - d.r)) for d in deltas], slots)
        weights = gather_rows([F.pad(d.paca_delta * d.scaling, (0, r_max - d.r)) for d in deltas], slots)
        batch = x.shape[0]
        flat = x.reshape(batch, -1, x.shape[-1])  # (batch, tokens, in)
        col_rows = columns.unsqueeze(1).expand(-1, flat.shape[1], -1)
        picked = torch.gather(flat, 2, col_rows).to(weights.dtype)  # (batch, tokens, r_max)
        out = torch.bmm(picked, weights.transpose(1, 2))  # (batch, tokens, out)
        return y + out.reshape(y.shape).to(y.dtype)


PAPER = ("PaCA: Partial Connection Adaptation for Efficient Fine-Tuning (Woo et al., 2025) "
         "https://arxiv.org/abs/2503.01905")

register_method("paca", config=PacaConfig, family="selective", paper=PAPER)(PacaDelta)
