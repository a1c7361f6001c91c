"""LoKr: Kronecker-product adaptation from LyCORIS, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", Yeh et al., 2023, https://arxiv.org/abs/2309.14859 (PEFT's `LOKR`).

Update rule (matrix view):  ΔW = s · W₁ ⊗ W₂,  s = alpha / r,  W₁ (a, c),  W₂ (b, d·kernel),
with out = a·b and in = c·d split by `factorization` (the divisor pair nearest √dim, or `decompose_factor`).
W₂ is full when r ≥ max(b, d)/2, else the rank-r product w2_a·w2_b (or a CP form for convolutions with
`use_effective_conv2d`); W₁ is full unless `decompose_both` and r < max(a, c)/2 (then w1_a·w1_b).
Init (PEFT's): W₁ = 0 (or w1_a = 0), W₂ Kaiming-uniform, so ΔW = 0 at step 0; "lycoris" zeroes the W₂ side
instead, "random" leaves every factor Kaiming-uniform.
Forward on Linear / Conv1D never forms ΔW: with x viewed as X (c, d), (W₁ ⊗ W₂)·x = vec(W₁ X W₂ᵀ).
PEFT's Conv1d layout of a full (b, d, k) W₂ is not a Kronecker product, so that case is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, WEIGHT_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import gather_rows, kaiming_
from .loha import LycorisConfig, LycorisDelta, cp_factor, cp_kernel_shape, effective_conv, lycoris_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class LokrConfig(LycorisConfig):
    """LoKr's fields (with LycorisConfig's). Attributes:
    decompose_both: also factor W₁ as w1_a·w1_b when r < max(a, c)/2.
    decompose_factor: split each dimension as (factor, dim/factor) when it divides; -1: the pair nearest √dim.
    rank_dropout_scale: rescale the rows kept by rank dropout by 1/kept fraction.
    init: "default" (W₁ = 0), "lycoris" (W₂'s last factor = 0) or "random" (no zero factor; tests).
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: Literal["default", "lycoris", "random"] = "default"

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise DeltatuneError(f"lokr: decompose_factor must be -1 or > 0, got {self.decompose_factor}")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dim` into (m, n), m·n = dim: (factor, dim/factor) when factor divides dim;
    otherwise the largest divisor m up to `factor` (any, for -1), stopping at the first one that reaches √dim,
    returned smaller first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = 1
    for candidate in range(2, dim + 1):
        if dim % candidate:
            continue
        if candidate > limit:
            break
        m = candidate
        if candidate >= dim // candidate:
            break
    return min(m, dim // m), max(m, dim // m)


@dataclasses.dataclass(frozen=True)
class KronLayout:
    """out = a·b, in = c·d; which factors are full; whether W₂ is in CP form."""

    a: int
    b: int
    c: int
    d: int
    full_w1: bool
    full_w2: bool
    effective: bool

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return self.a, self.b, self.c, self.d


def kron_layout(config: LokrConfig, info: HostInfo, r: int) -> KronLayout:
    a, b = factorization(info.out_features, config.decompose_factor)
    c, d = factorization(info.in_features, config.decompose_factor)
    full_w1 = not (config.decompose_both and r < max(a, c) / 2)
    full_w2 = r >= max(b, d) / 2
    return KronLayout(a, b, c, d, full_w1, full_w2, effective_conv(config, info) and not full_w2)


def kron_apply(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """(W₁ ⊗ W₂)·x without forming the product: x (..., c·d) viewed as X (c, d) gives vec(W₁ X W₂ᵀ).
    W₁ (a, c) and W₂ (b, d), or one pair per batch row, (batch, a, c) and (batch, b, d), with x
    (batch, tokens, c·d)."""
    grid = x.to(w1.dtype).reshape(*x.shape[:-1], w1.shape[-1], w2.shape[-1])  # (..., c, d)
    pattern = "nac,ntcd,nbd->ntab" if w1.ndim == 3 else "ac,...cd,bd->...ab"
    return torch.einsum(pattern, w1, grid, w2).reshape(*x.shape[:-1], -1)


class LokrDelta(LycorisDelta):
    """y = base(x) + s·(W₁ ⊗ W₂)·x."""

    def __init__(self, config: LokrConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(self.r)
        lay = self.layout = kron_layout(config, info, self.r)
        kernel = math.prod(info.kernel_size)
        if lay.full_w2 and info.kind == "conv1d" and kernel > 1:
            raise DeltatuneError(
                f"lokr: a full-rank W₂ on Conv1d {path!r} (r={self.r} >= max({lay.b}, {lay.d})/2) is laid "
                "out by PEFT as something other than a Kronecker product; lower r or exclude the layer"
            )
        r = self.r
        if lay.full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(lay.a, lay.c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(lay.a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, lay.c))
        if lay.full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(lay.b, lay.d, *info.kernel_size))
        elif lay.effective:
            self.lokr_t2 = nn.Parameter(torch.empty(cp_kernel_shape(info, r)))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, lay.b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, lay.d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(lay.b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, lay.d * kernel))
        self.reset(config.init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        kaiming_(*self.parameters())
        w1_zero = "lokr_w1" if self.layout.full_w1 else "lokr_w1_a"
        w2_zero = "lokr_w2" if self.layout.full_w2 else "lokr_w2_b"
        if init != "random":
            nn.init.zeros_(getattr(self, w1_zero if init == "default" else w2_zero))

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        """W₁ (a, c) and W₂ as a matrix (b, d·kernel)."""
        w1 = self.lokr_w1 if self.layout.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.layout.full_w2:
            w2 = self.lokr_w2.reshape(self.layout.b, -1)
        elif self.layout.effective:
            w2 = cp_factor(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def matrix(self) -> Tensor:
        w1, w2 = self.kron_factors()
        return torch.kron(w1, w2) * self.scaling

    def rescales_rank_dropout(self) -> bool:
        return self.config.rank_dropout_scale

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS:
            return super().forward(x, y, host)
        if self.skipped():
            return y
        w1, w2 = self.kron_factors()
        update = kron_apply(x, w1, w2 * self.scaling)
        mask = self.row_mask(update, self.rescales_rank_dropout())
        return y + (update if mask is None else update * mask).to(y.dtype)

    # ---- mixed batches: each row's W₁, W₂ gathered, one einsum ---------------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        dims = deltas[0].layout.dims
        if host.info.kind not in LINEAR_KINDS or any(
            d.layout.dims != dims or (d.training and (d.config.rank_dropout or d.config.module_dropout))
            for d in deltas
        ):
            return super().per_row(deltas, slots, x, y, host, cache)
        pairs = [d.kron_factors() for d in deltas]
        w1 = gather_rows([w1 for w1, _ in pairs], slots)  # (batch, a, c)
        w2 = gather_rows([w2 * d.scaling for (_, w2), d in zip(pairs, deltas)], slots)  # (batch, b, d)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, c·d)
        return y + kron_apply(flat, w1, w2).reshape(y.shape).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: LokrConfig, info: HostInfo, path: str) -> int:
        r = config.rank_for(path)
        lay = kron_layout(config, info, r)
        kernel = math.prod(info.kernel_size)
        w1 = lay.a * lay.c if lay.full_w1 else r * (lay.a + lay.c)
        if lay.full_w2:
            w2 = lay.b * lay.d * kernel
        elif lay.effective:
            w2 = r * r * kernel + r * (lay.b + lay.d)
        else:
            w2 = r * (lay.b + lay.d * kernel)
        return w1 + w2


PAPER = ("Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation "
         "(Yeh et al., 2023) https://arxiv.org/abs/2309.14859")
register_method(
    "lokr", config=LokrConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS,
    peft=lycoris_peft_format("LOKR", ("decompose_both", "decompose_factor", "rank_dropout_scale"),
                             {"default": True, "lycoris": "lycoris", "random": False}),
)(LokrDelta)
