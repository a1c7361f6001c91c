"""Pure low-rank algebra for adapter arithmetic: truncated SVD of a dense update or of a factored one.

Everything works on the matrix view (out, fan_in) of an update ΔW. A factored update ΔW = B·A (B: out × R,
A: R × fan_in) is re-factorised without ever forming ΔW: B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR), then the SVD of
the small R × R core R_b·R_aᵀ gives ΔW's exact singular values and vectors. The result splits √σ onto both
factors (as mergekit's extract-lora does), so A and B have comparable scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.errors import DeltatuneError


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ B·A at rank r, with what the truncation lost.

    Attributes:
        a: (r, fan_in).
        b: (out, r).
        singular_values: every singular value of the (untruncated) update, descending.
        rank: r.
    """

    a: Tensor
    b: Tensor
    singular_values: Tensor
    rank: int

    @property
    def relative_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F, exact from the singular values (0 for a zero update)."""
        energy = self.singular_values.double().square()
        total = float(energy.sum())
        return 0.0 if total == 0 else float(energy[self.rank:].sum() / total) ** 0.5

    @property
    def dropped_energy(self) -> float:
        return float(self.singular_values.double()[self.rank:].square().sum())

    @property
    def total_energy(self) -> float:
        return float(self.singular_values.double().square().sum())


def choose_rank(singular_values: Tensor, rank: int | None, energy: float | None) -> int:
    """The rank to keep: `rank`, or the smallest one keeping an `energy` fraction of Σσ², or the smaller of both.

    Never 0 (an adapter layer needs rank ≥ 1; a zero update stays zero at rank 1)."""
    if rank is None and energy is None:
        raise DeltatuneError("choose a target rank or an energy threshold (e.g. rank=16 or energy=0.9)")
    if rank is not None and rank < 1:
        raise DeltatuneError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise DeltatuneError(f"energy must be in (0, 1], got {energy}")
    available = singular_values.numel()
    keep = available if rank is None else min(rank, available)
    if energy is not None:
        squares = singular_values.double().square()
        total = float(squares.sum())
        if total > 0:
            cumulative = torch.cumsum(squares, 0) / total
            needed = int((cumulative < energy - 1e-12).sum()) + 1
            keep = min(keep, needed)
    return max(1, keep)


def _split(u: Tensor, s: Tensor, vh: Tensor, keep: int, dtype: torch.dtype,
           orthonormal_a: bool = False) -> tuple[Tensor, Tensor]:
    root = s[:keep] if orthonormal_a else s[:keep].sqrt()
    b = (u[:, :keep] * root).to(dtype).contiguous()
    a = (vh[:keep] if orthonormal_a else root[:, None] * vh[:keep]).to(dtype).contiguous()
    if keep > s.numel():  # pad a tiny update up to rank 1
        b = torch.zeros(u.shape[0], keep, dtype=dtype)
        a = torch.zeros(keep, vh.shape[1], dtype=dtype)
    return a, b


def truncate_dense(delta: Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Truncated SVD of a dense matrix-view update (computed in float64 for small sizes, else float32)."""
    if delta.ndim != 2:
        raise ValueError("truncate_dense takes a matrix-view (out, fan_in) update")
    work = delta.double() if delta.numel() <= 4_000_000 else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = choose_rank(s, rank, energy)
    a, b = _split(u, s, vh, keep, delta.dtype if delta.is_floating_point() else torch.float32)
    return LowRank(a, b, s.float(), keep)


def truncate_factored(a: Tensor, b: Tensor, rank: int | None = None, energy: float | None = None, *,
                      orthonormal_a: bool = False) -> LowRank:
    """Truncated SVD of B·A (B: out × R, A: R × fan_in) through thin QRs of the factors; exact, no ΔW formed.

    orthonormal_a: A = Vᵀ (orthonormal rows) and B = U·Σ, instead of √Σ on both."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    keep = choose_rank(s, rank, energy)
    a_new, b_new = _split(q_b @ u, s, vh @ q_a.t(), keep, dtype, orthonormal_a)
    return LowRank(a_new, b_new, s.float(), keep)


def concatenate(factors: list[tuple[Tensor, Tensor]], weights: list[float]) -> tuple[Tensor, Tensor]:
    """Σ wᵢ·Bᵢ·Aᵢ as one factored update of rank Σ rᵢ: A = [A₁; …; Aₙ], B = [w₁B₁, …, wₙBₙ] (exact)."""
    a = torch.cat([a for a, _ in factors], dim=0)
    b = torch.cat([w * b for (_, b), w in zip(factors, weights)], dim=1)
    return a, b
