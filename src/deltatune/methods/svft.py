"""SVFT: "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", Lingam et al., 2024,
https://arxiv.org/abs/2405.19597

Update rule (matrix view, W = U Σ Vᵀ over the top n = r singular triplets, default all k = min(out, fan_in)):
    W' = W + U M Vᵀ,   M (n × n) sparse with trainable entries at a fixed pattern:
- "plain": the diagonal (SVFT^P, n coefficients);
- "banded": the diagonal and d off-diagonals on each side (SVFT^B_d, n(2d+1) − d(d+1) coefficients);
- "random": as many coefficients as banded-d at uniformly drawn (row, column) positions (SVFT^R_d; drawn with
  replacement as in the reference code, so a repeated position simply sums). The positions are regenerated from
  `seed` and the module path, never saved.
Init: M = 0, so the model is unchanged (the reference code starts M Kaiming-normal behind a trainable sigmoid gate
at ½; deltatune keeps the paper's ΔW = U M Vᵀ with an identity start and no gate).
Parameters: `m` (number of pattern positions,). U and V are frozen buffers recomputed from the base weight (see
`spectral.py` for why that is stable); ΔW always lies in span(U) ⊗ span(V).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from .spectral import SingularDelta, full_rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class SvftConfig(DeltaConfig):
    """Attributes:
    pattern: where M has trainable entries: "plain" (diagonal), "banded" or "random".
    d: off-diagonals on each side of the band ("banded"); "random" draws as many entries as banded-d;
        unused by "plain".
    r: how many of the top singular vectors span the update; None uses all k = min(out, fan_in).
    seed: seed of the "random" pattern (mixed with each module's path, so layers differ).
    """

    pattern: Literal["plain", "banded", "random"] = "banded"
    d: int = 2
    r: int | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.d < 0:
            raise DeltatuneError(f"svft: d (off-diagonals per side) must be >= 0, got d={self.d}")
        if self.r is not None and self.r <= 0:
            raise DeltatuneError(f"svft: r must be > 0 or None (all singular vectors), got r={self.r}")


def band_size(n: int, d: int) -> int:
    """Entries of an n × n band with d off-diagonals per side: n(2d+1) − d(d+1), all n² once d ≥ n."""
    return n * (2 * d + 1) - d * (d + 1) if d < n else n * n


def svft_pattern(config: SvftConfig, n: int, path: str) -> tuple[Tensor, Tensor]:
    """(rows, cols) of M's trainable entries."""
    if config.pattern == "plain":
        diagonal = torch.arange(n)
        return diagonal, diagonal.clone()
    if config.pattern == "random":
        g = torch.Generator().manual_seed(config.seed + zlib.crc32(path.encode()))
        count = band_size(n, config.d)
        return torch.randint(0, n, (count,), generator=g), torch.randint(0, n, (count,), generator=g)
    rows, cols = [], []
    for offset in range(-min(config.d, n - 1), min(config.d, n - 1) + 1):
        start = torch.arange(max(0, -offset), n - max(0, offset))
        rows.append(start)
        cols.append(start + offset)
    return torch.cat(rows), torch.cat(cols)


class SvftDelta(SingularDelta):
    """y = base(x) + U·(M·(Vᵀx)), M sparse."""

    def __init__(self, config: SvftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.n = self.k if config.r is None else config.r
        self.check_rank(self.n, limit=self.k)
        rows, cols = svft_pattern(config, self.n, path)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.m = nn.Parameter(torch.zeros(rows.numel()))

    def kept(self) -> slice:
        return slice(0, self.n)

    def core(self, h: Tensor) -> Tensor:
        # (M h)_i = Σ_j M_ij h_j, summed over the pattern's (i, j) pairs
        return torch.zeros_like(h).index_add(-1, self.rows, h.index_select(-1, self.cols) * self.m)

    def delta_matrix(self) -> Tensor:
        return (self.u[:, self.rows] * self.m) @ self.vh[self.cols]  # Σ m_ij u_i v_jᵀ

    @classmethod
    def num_parameters(cls, config: SvftConfig, info: HostInfo, path: str) -> int:
        n = full_rank(info) if config.r is None else config.r
        return n if config.pattern == "plain" else band_size(n, config.d)


PAPER = "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors (Lingam et al., 2024) https://arxiv.org/abs/2405.19597"
register_method("svft", config=SvftConfig, family="singular-value", paper=PAPER)(SvftDelta)
