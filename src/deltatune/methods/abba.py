"""ABBA: "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models", Singhal, Ponkshe, Vartak
and Vepakomma, 2025, https://arxiv.org/abs/2505.14238

Update rule (matrix view, W of shape out × in):  W' = W + s·(B1·A1) ⊙ (B2·A2),  s = alpha² / √(r1·r2)
(the paper's rsLoRA-style scaling; with alpha = r1 = r2 = r it equals r, as in the authors' code).
The Hadamard product of a rank-r1 and a rank-r2 matrix has rank up to r1·r2, for LoRA's parameter count at
r = r1 + r2. It is computed without materialising ΔW through the Khatri-Rao identity
(B1A1) ⊙ (B2A2) = (B1 ⊙ᵣ B2)(A1 ⊙꜀ A2), a rank-r1·r2 LoRA whose factors are row-wise / column-wise products.
Init ("default", the paper's): B1·A1 is the best rank-r1 approximation of W (B1 = U√Σ, A1 = √ΣVᵀ from the
truncated SVD), A2 Kaiming-uniform, B2 = 0, so ΔW = 0 at step 0. "random": all four Kaiming-uniform (tests).
Shapes: A1 (r1, fan_in), B1 (out, r1), A2 (r2, fan_in), B2 (out, r2); fan_in = in_features (vocabulary for an
Embedding, in_channels·kernel for a convolution).

This module also holds `LowRankRows`, the factored forward and gathered mixed-batch kernel shared by this family's
methods whose update can be written as up·down (ABBA, GraLoRA, DeLoRA, LoRMA).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host


# ---- shared by the low-rank family: ΔW = up·down, applied factored ------------------------------------------------
def low_rank_apply(inputs: Tensor, down: Tensor, up: Tensor, channel_dim: int = -1) -> Tensor:
    """up·(down·z) for every feature vector z of `inputs` along `channel_dim`; down (r, in), up (out, r)."""
    z = inputs.movedim(channel_dim, -1).to(down.dtype)
    return F.linear(F.linear(z, down), up).movedim(-1, channel_dim)


def routed_low_rank(
    inputs: Tensor, factors: list[tuple[Tensor, Tensor]], slots: Tensor, channel_dim: int = -1
) -> Tensor:
    """Per-row `low_rank_apply`: batch row i uses factors[slots[i]], rows with slot -1 get zeros.

    Ranks may differ (factors are zero-padded to the largest); the work is one gather and two batched matmuls,
    whatever the number of adapters.
    """
    rank = max(down.shape[0] for down, _ in factors)
    downs = [F.pad(down, (0, 0, 0, rank - down.shape[0])) for down, _ in factors]
    ups = [F.pad(up, (0, rank - up.shape[1])) for _, up in factors]
    downs.append(torch.zeros_like(downs[0]))
    ups.append(torch.zeros_like(ups[0]))
    idx = torch.where(slots < 0, len(factors), slots)
    z = inputs.movedim(channel_dim, -1).to(downs[0].dtype)
    flat = z.reshape(z.shape[0], -1, z.shape[-1])  # (batch, positions, in)
    h = torch.bmm(flat, torch.stack(downs)[idx].transpose(1, 2))  # (batch, positions, r)
    out = torch.bmm(h, torch.stack(ups)[idx].transpose(1, 2))  # (batch, positions, out)
    return out.reshape(*z.shape[:-1], -1).movedim(-1, channel_dim)


def dropped_input(delta: Delta, x: Tensor) -> Tensor:
    """Dropout on a delta's input while training (`delta.dropout`); never on an Embedding's token ids."""
    if delta.dropout and delta.training and delta.info.kind != "embedding":
        return F.dropout(x, delta.dropout, training=True)
    return x


def dense_forward(delta: Delta, x: Tensor, y: Tensor, host: Host, weight: Tensor) -> Tensor:
    """y + host_op(dropout(x), ΔW) for a ΔW in native layout (token ids of an Embedding are left as they are)."""
    x = dropped_input(delta, x)
    x = x.to(weight.dtype) if x.is_floating_point() else x
    return y + host.apply(x, weight).to(y.dtype)


class LowRankRows(Delta):
    """A delta whose update is `up·down` applied to `factor_input` (x, or the base output for LoRMA).

    Subclasses give `low_rank_factors(host)`; they get a factored forward on the hosts `factored` accepts (dense
    ΔW through `delta_weight` elsewhere) and a gathered mixed-batch kernel. Adds no state of its own.
    """

    dropout: float = 0.0

    def low_rank_factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """(down (r, in), up (out, r)) with every scaling folded in."""
        raise NotImplementedError

    def factored(self, host: Host) -> bool:
        return self.info.kind in LINEAR_KINDS

    def factor_input(self, x: Tensor, host: Host) -> Tensor:
        return self.dropped(x)

    def dropped(self, x: Tensor) -> Tensor:
        return dropped_input(self, x)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if not self.factored(host):
            return dense_forward(self, x, y, host, self.delta_weight(host))
        down, up = self.low_rank_factors(host)
        return y + low_rank_apply(self.factor_input(x, host), down, up, self.info.channel_dim).to(y.dtype)

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if any(not d.factored(host) or (d.training and d.dropout) for d in deltas):
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        factors = [d.low_rank_factors(host) for d in deltas]
        inputs = deltas[0].factor_input(x, host)
        return y + routed_low_rank(inputs, factors, slots, host.info.channel_dim).to(y.dtype)


def refuse_unknown_peft_fields(raw: dict, known: set[str], title: str) -> None:
    """PEFT config loading is an allowlist: a field we cannot reproduce, set to a non-empty value, is an error."""
    unknown = sorted(k for k, v in raw.items() if k not in known and v not in (None, False, "", [], {}))
    if unknown:
        raise DeltatuneError(f"PEFT {title} field {unknown[0]}={raw[unknown[0]]!r} is not supported by deltatune")


def check_rank_and_dropout(config: DeltaConfig, r: int, dropout: float, rank_pattern: dict | None = None) -> None:
    """The checks every low-rank config shares: ranks > 0 and dropout in [0, 1)."""
    rank_pattern = rank_pattern or {}
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        pattern = f", rank_pattern={rank_pattern}" if rank_pattern else ""
        raise DeltatuneError(f"{config.method}: r must be > 0, got r={r}{pattern}")
    if not 0.0 <= dropout < 1.0:
        raise DeltatuneError(f"{config.method}: dropout must be in [0, 1), got {dropout}")


def kaiming_(tensor: Tensor) -> Tensor:
    """nn.Linear's default init (Kaiming-uniform, a = √5), as LoRA uses for A."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of a matrix: U_r (out, r), σ_r (r,), V_rᵀ (r, in), computed in float32."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


# ---- ABBA ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class AbbaConfig(DeltaConfig):
    """Attributes:
    r1: rank of the first low-rank factor B1·A1.
    r2: rank of the second low-rank factor B2·A2 (the update has rank up to r1·r2).
    alpha: scaling numerator: s = alpha² / √(r1·r2).
    dropout: dropout probability on the adapter's input.
    init: "default" (B1·A1 = truncated SVD of W, A2 Kaiming, B2 = 0) or "random" (all Kaiming; tests).
    """

    r1: int = 4
    r2: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        super().validate()
        if self.r1 <= 0 or self.r2 <= 0:
            raise DeltatuneError(f"abba: r1 and r2 must be > 0, got r1={self.r1}, r2={self.r2}")
        check_rank_and_dropout(self, self.r1, self.dropout)


def khatri_rao_factors(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(A1 ⊙꜀ A2 (r1·r2, in), B1 ⊙ᵣ B2 (out, r1·r2)): their product is (B1A1) ⊙ (B2A2)."""
    down = (a1.unsqueeze(1) * a2.unsqueeze(0)).reshape(-1, a1.shape[1])
    up = (b1.unsqueeze(2) * b2.unsqueeze(1)).reshape(b1.shape[0], -1)
    return down, up


class AbbaDelta(LowRankRows):
    """y = base(x) + s·(B1 ⊙ᵣ B2)((A1 ⊙꜀ A2)x)."""

    def __init__(self, config: AbbaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        limit = min(info.out_features, info.fan_in)
        if config.init == "default" and config.r1 > limit:  # B1·A1 starts as the truncated SVD of W
            raise DeltatuneError(f"abba: r1={config.r1} exceeds min(out_features, fan_in)={limit} at {path!r}, the "
                                 "largest rank of W's truncated SVD; lower r1")
        self.scaling = config.alpha**2 / math.sqrt(config.r1 * config.r2)
        self.dropout = config.dropout
        self.abba_A1 = nn.Parameter(kaiming_(torch.empty(config.r1, info.fan_in)))
        self.abba_B1 = nn.Parameter(kaiming_(torch.empty(info.out_features, config.r1)))
        self.abba_A2 = nn.Parameter(kaiming_(torch.empty(config.r2, info.fan_in)))
        self.abba_B2 = nn.Parameter(kaiming_(torch.empty(info.out_features, config.r2)))
        if config.init == "default":
            nn.init.zeros_(self.abba_B2)

    def setup(self, host: Host) -> None:
        if self.config.init != "default":
            return
        u, s, vh = svd_factors(to_matrix(self.info, host.weight()), self.config.r1)
        root = s.sqrt()
        self.abba_B1.copy_(u * root)
        self.abba_A1.copy_(root.unsqueeze(1) * vh)

    def low_rank_factors(self, host: Host) -> tuple[Tensor, Tensor]:
        down, up = khatri_rao_factors(self.abba_A1, self.abba_B1, self.abba_A2, self.abba_B2)
        return down, up * self.scaling

    def delta_weight(self, host: Host) -> Tensor:
        hadamard = (self.abba_B1 @ self.abba_A1) * (self.abba_B2 @ self.abba_A2)
        return from_matrix(self.info, hadamard * self.scaling)

    @classmethod
    def num_parameters(cls, config: AbbaConfig, info: HostInfo, path: str) -> int:
        return (config.r1 + config.r2) * (info.fan_in + info.out_features)


PAPER = ("ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models (Singhal et al., 2025) "
         "https://arxiv.org/abs/2505.14238")
register_method("abba", config=AbbaConfig, family="low-rank", paper=PAPER)(AbbaDelta)
