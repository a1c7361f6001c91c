"""LoLDU: "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning",
Shi et al., 2024, https://arxiv.org/abs/2410.13618

Decomposition (matrix view, W of shape out × in): partial-pivoting LU, W = P·L·D·U with P a permutation, L unit
lower-triangular (out × k), D = diag(d) the pivots and U unit upper-triangular (k × in), k = min(out, in).
LoLDU keeps the first r components, rewrites the base weight as a residual plus a scaled LDU part and trains only
the diagonal z (and the scale σ):
    W' = W_res + σ·(P·L_r)·diag(z)·U_r,   W_res = W − σ₀·(P·L_r)·diag(z₀)·U_r.
Init: z₀ = d_r (the first r pivots), σ₀ = alpha / r, so W' = W at step 0.
deltatune never rewrites base weights, so the same model is written as an additive update:
    ΔW = (P·L_r)·diag(σ·z − σ₀·z₀)·U_r.
P·L_r, U_r, z₀ and σ₀ are frozen and recomputed from the base weight when the delta is attached, as the authors'
code does (only z is saved there); they are non-persistent buffers, so the file holds z and σ only.
Shapes: z (r,), σ (); trainable parameters r + 1 (r with `train_scale=False`, the authors' code default).
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
from .factored import FactoredDelta, check_positive


def ldu(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W = (P·L)·diag(d)·U: returns P·L (out × k), d (k,), unit upper-triangular U (k × in)."""
    perm, lower, upper = torch.linalg.lu(weight)
    pivots = torch.diagonal(upper)
    return perm @ lower, pivots, upper / pivots.unsqueeze(1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LolduConfig(DeltaConfig):
    """Attributes:
    r: number of LDU components kept (the length of the trainable diagonal z); at most min(out, in).
    alpha: σ₀ = alpha / r, the initial value of the scale σ.
    train_scale: train σ as well as z (False keeps σ at σ₀, as the authors' code does).
    """

    r: int = 16
    alpha: float = 1.0
    train_scale: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive("loldu", r=self.r)


class LolduDelta(FactoredDelta):
    """ΔW = (P·L_r)·diag(σ·z − σ₀·z₀)·U_r: down = U_r, up = (P·L_r)·diag(σ·z − σ₀·z₀)."""

    def __init__(self, config: LolduConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        r = config.r
        self.check_rank(r, min(info.out_features, info.fan_in))
        self.z = nn.Parameter(torch.zeros(r))
        scale = torch.tensor(config.alpha / r)
        if config.train_scale:
            self.sigma = nn.Parameter(scale.clone())
        else:
            self.register_buffer("sigma", scale.clone(), persistent=False)
        self.register_buffer("sigma0", scale, persistent=False)
        self.register_buffer("z0", torch.zeros(r), persistent=False)
        self.register_buffer("lower", torch.zeros(info.out_features, r), persistent=False)  # P·L_r
        self.register_buffer("upper", torch.zeros(r, info.fan_in), persistent=False)  # U_r

    def setup(self, host: Host) -> None:
        r = self.config.r
        weight = to_matrix(self.info, host.weight()).detach().to(torch.float32)
        lower, pivots, upper = ldu(weight)
        if not torch.isfinite(upper[:r]).all() or (pivots[:r] == 0).any():
            raise DeltatuneError(
                f"loldu: the base weight of {self.path!r} has a zero pivot among its first {r} LDU components "
                "(it is rank-deficient); lower r or exclude this module"
            )
        self.lower.copy_(lower[:, :r])
        self.upper.copy_(upper[:r])
        self.z0.copy_(pivots[:r])
        self.z.copy_(pivots[:r])

    def coefficients(self) -> Tensor:
        """σ·z − σ₀·z₀: the diagonal of the additive update (zero at init)."""
        return self.sigma * self.z - self.sigma0 * self.z0

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.upper, self.lower * self.coefficients()

    @classmethod
    def num_parameters(cls, config: LolduConfig, info: HostInfo, path: str) -> int:
        return config.r + (1 if config.train_scale else 0)


PAPER = ("LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning "
         "(Shi et al., 2024) https://arxiv.org/abs/2410.13618")
register_method("loldu", config=LolduConfig, family="low-rank", paper=PAPER)(LolduDelta)
