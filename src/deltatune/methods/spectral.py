"""Singular-value-space methods: the shared SVD machinery, plus SVF and SVFit (which rescale singular values).

Every method of this group starts from the SVD of the base weight in its matrix view (out × fan_in),
W = U Σ Vᵀ (thin: k = min(out, fan_in) triplets, σ₁ ≥ … ≥ σ_k), and trains something inside that basis.

- SVF, "Transformer²: Self-adaptive LLMs", Sun et al., 2025, https://arxiv.org/abs/2501.06252 (Singular Value
  Fine-tuning):  W' = U (Σ ⊙ diag(z)) Vᵀ,  so ΔW = U diag(σ ⊙ (z − 1)) Vᵀ.
  Init z = 1 (the model is unchanged). Parameters: z (k,). The reference code reaches z through a sigmoid and
  rescales the spectrum to keep Σσ; deltatune trains z as the paper's equation writes it.
- SVFit, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values", Sun et al.,
  2024, https://arxiv.org/abs/2409.05926:  W' = U_r diag(σ') V_rᵀ + W_res with W_res = W − U_r Σ_r V_rᵀ frozen,
  so ΔW = U_r diag(σ' − σ_r) V_rᵀ. Init σ' = σ_r (unchanged model). Parameters: σ' (r,) as `singular_values`.

The frozen singular vectors are non-persistent buffers, never saved: `setup` recomputes them from the base weight
(torch.linalg.svd in float32, or float64 for float64 deltas, which is deterministic for a given weight, device and
library). Each triplet's sign is fixed (the largest-magnitude entry of u_i is positive) so that methods whose update
is not sign-invariant (SVFT's off-diagonal coefficients, Spectral Adapter's vector offsets, SALT's residual LoRA)
see the same basis from CPU and GPU solvers; only (near-)repeated singular values, whose vectors are not unique,
reproduce to rounding alone. SVF and SVFit are sign-invariant (diagonal updates).

Linear, Conv1D and Embedding hosts run the factored form ΔW·x = U·core(Vᵀx); convolutions apply the dense ΔW.
Mixed batches of SVF / SVFit adapters gather each row's diagonal (one shared projection onto the basis).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import gather_rows, rows_per_channel


def base_svd(info: HostInfo, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(U (out, k), σ (k,), Vᵀ (k, fan_in)) of the weight's matrix view, signs fixed, cast to `dtype`."""
    compute = torch.promote_types(dtype, torch.float32)
    u, sigma, vh = torch.linalg.svd(to_matrix(info, weight.detach()).to(compute), full_matrices=False)
    pivot = u.abs().argmax(dim=0)  # one row per column: where u_i is largest
    sign = torch.sign(u.gather(0, pivot.unsqueeze(0)).squeeze(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (u * sign).to(dtype), sigma.to(dtype), (vh * sign.unsqueeze(1)).to(dtype)


def full_rank(info: HostInfo) -> int:
    """k = min(out, fan_in): the number of singular triplets of the matrix view."""
    return min(info.out_features, info.fan_in)


class SingularDelta(Delta):
    """A weight update written in the base weight's singular basis: ΔW = U·core·Vᵀ over the kept triplets.

    Subclasses create their parameters in __init__, say which triplets they keep (`kept`) and implement `core`
    (a linear map of basis coordinates, (..., n) -> (..., n)); methods whose update leaves the basis override
    `update` and `delta_matrix` instead.
    """

    def __init__(self, config: DeltaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.k = full_rank(info)
        for name in ("u", "sigma", "vh"):  # filled by setup; recomputed from the base, never saved
            self.register_buffer(name, torch.empty(0), persistent=False)

    def kept(self) -> slice:
        """Which triplets (in descending σ order) the method works with."""
        return slice(0, self.k)

    def setup(self, host: Host) -> None:
        ref = next(self.parameters())
        u, sigma, vh = base_svd(self.info, host.weight(), ref.dtype)
        keep = self.kept()
        self.u = u[:, keep].contiguous().to(ref.device)  # (out, n)
        self.sigma = sigma[keep].contiguous().to(ref.device)  # (n,)
        self.vh = vh[keep].contiguous().to(ref.device)  # (n, fan_in)

    def core(self, h: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement core or update/delta_matrix")

    def project(self, x: Tensor, rows: Tensor) -> Tensor:
        """x·rowsᵀ for a (n, fan_in) matrix: Linear / Conv1D features, or Embedding token ids (one-hot columns)."""
        if self.info.kind == "embedding":
            return F.embedding(x, rows.t())
        return F.linear(x.to(rows.dtype), rows)

    def update(self, x: Tensor) -> Tensor:
        """ΔW·x in the host's output layout (Linear / Conv1D / Embedding)."""
        return F.linear(self.core(self.project(x, self.vh)), self.u)  # (..., out)

    def delta_matrix(self) -> Tensor:
        """ΔW in the matrix view: U·core(Vᵀ rows)."""
        return self.u @ self.core(self.vh.t()).t()

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind in CONV_KINDS:
            return super().forward(x, y, host)  # the host's convolution with the dense ΔW
        return y + self.update(x).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.delta_matrix())


class DiagonalSingularDelta(SingularDelta):
    """ΔW = U diag(δ) Vᵀ: the update only moves singular values. Mixed batches gather δ per row."""

    def shift(self) -> Tensor:
        """δ (n,): the change of each kept singular value."""
        raise NotImplementedError

    def core(self, h: Tensor) -> Tensor:
        return h * self.shift()

    def delta_matrix(self) -> Tensor:
        return (self.u * self.shift()) @ self.vh

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        ref = deltas[0]
        same_basis = all(d.vh.shape == ref.vh.shape and torch.equal(d.sigma, ref.sigma) for d in deltas)
        if host.info.kind in CONV_KINDS or not same_basis:
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        rows = gather_rows([d.shift() for d in deltas], slots)  # (batch, n); zeros for rows without adapter
        h = ref.project(x, ref.vh)  # (batch, ..., n): one projection shared by every adapter
        h = h * rows_per_channel(host.info, rows, h.ndim)
        return y + F.linear(h, ref.u).to(y.dtype)


# ---- SVF (Transformer²) ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class SvfConfig(DeltaConfig):
    """SVF has no fields beyond where it goes: z covers every singular value of each adapted layer."""


class SvfDelta(DiagonalSingularDelta):
    """W' = U (Σ ⊙ diag(z)) Vᵀ;  z = 1 is the base model."""

    def __init__(self, config: SvfConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.z = nn.Parameter(torch.ones(self.k))

    def shift(self) -> Tensor:
        return self.sigma * (self.z - 1)

    @classmethod
    def num_parameters(cls, config: SvfConfig, info: HostInfo, path: str) -> int:
        return min(info.out_features, info.fan_in)


# ---- SVFit ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class SvfitConfig(DeltaConfig):
    """Attributes:
    r: how many of the largest singular values train (the paper picks r so that they hold ≥ 99% of the
        spectrum); None trains all k = min(out, fan_in) of them.
    """

    r: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.r is not None and self.r <= 0:
            raise DeltatuneError(f"svfit: r must be > 0 or None (all singular values), got r={self.r}")


class SvfitDelta(DiagonalSingularDelta):
    """W' = U_r diag(σ') V_rᵀ + W_res;  σ' starts at σ_r."""

    def __init__(self, config: SvfitConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = self.k if config.r is None else config.r
        self.check_rank(self.r, limit=self.k)
        self.singular_values = nn.Parameter(torch.zeros(self.r))  # σ', set to σ_r by setup

    def kept(self) -> slice:
        return slice(0, self.r)

    def setup(self, host: Host) -> None:
        super().setup(host)
        self.singular_values.copy_(self.sigma)

    def shift(self) -> Tensor:
        return self.singular_values - self.sigma

    @classmethod
    def num_parameters(cls, config: SvfitConfig, info: HostInfo, path: str) -> int:
        k = min(info.out_features, info.fan_in)
        return k if config.r is None else config.r


PAPER_SVF = "Transformer²: Self-adaptive LLMs (Sun et al., 2025) https://arxiv.org/abs/2501.06252"
PAPER_SVFIT = ("SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values "
               "(Sun et al., 2024) https://arxiv.org/abs/2409.05926")

register_method("svf", config=SvfConfig, family="singular-value", paper=PAPER_SVF)(SvfDelta)
register_method("svfit", config=SvfitConfig, family="singular-value", paper=PAPER_SVFIT)(SvfitDelta)
