"""LoHa: "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
Hyeon-Woo et al., 2021, https://arxiv.org/abs/2108.06098 (as packaged by LyCORIS and PEFT's `LOHA`).

Update rule (matrix view, W of shape out × fan_in):  ΔW = s · (B₁A₁) ⊙ (B₂A₂),  s = alpha / r.
The Hadamard product of two rank-r matrices has rank up to r², for the parameters of two rank-r LoRAs.
Init (PEFT's, from FedPara's He init): A₁, B₁, B₂ Kaiming-uniform, A₂ = 0, so ΔW = 0 at step 0;
"random" makes A₂ Kaiming-uniform too (a non-identity start, for tests and PEFT parity).
Shapes (PEFT names): hada_w1_a = B₁ (out, r), hada_w1_b = A₁ (r, fan_in), likewise hada_w2_a / hada_w2_b.
Convolutions with `use_effective_conv2d` (FedPara's Proposition 3) use a CP form per factor instead:
hada_t1 (r, r, *kernel), hada_w1_a (r, out), hada_w1_b (r, in), factor = Σ t1[i,j,…]·w1_a[i,p]·w1_b[j,q]
(Conv1d kernels carry a trailing 1, as PEFT stores them; kernel size 1 keeps the flat form, as in PEFT).
Training-time options as in PEFT: `rank_dropout` drops output rows of ΔW (rescaled by the kept fraction),
`module_dropout` skips the whole delta for a step.

This module also holds what LoHa and LoKr (lokr.py) share: the LyCORIS config fields, PEFT field mapping and
the dropout rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, WEIGHT_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import add_dense, check_dropout, check_rank, kaiming_, refuse_unknown_peft_fields
from .lora import pattern_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisConfig(DeltaConfig):
    """Fields LoHa and LoKr share (PEFT's LycorisConfig).

    Attributes:
        r: rank of each factor.
        alpha: scaling numerator, s = alpha / r.
        rank_dropout: while training, probability of dropping each output row of ΔW.
        module_dropout: while training, probability of skipping the delta for a whole step.
        use_effective_conv2d: CP-decomposed factors for convolutions with a kernel larger than 1.
        rank_pattern: module-path regex -> rank, overriding r (PEFT's rule).
        alpha_pattern: module-path regex -> alpha, overriding alpha.
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank(self, self.r, self.rank_pattern)
        for name in ("rank_dropout", "module_dropout"):
            check_dropout(self.method, getattr(self, name), name)

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, self.alpha) / self.rank_for(path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LohaConfig(LycorisConfig):
    """LoHa's fields. Attributes:
    init: "default" (A₂ = 0: identity at init) or "random" (every factor Kaiming-uniform).
    """

    init: Literal["default", "random"] = "default"


def effective_conv(config: LycorisConfig, info: HostInfo) -> bool:
    """PEFT's rule: the CP form is used on convolutions whose kernel is not 1 (1×1 stays flat)."""
    return config.use_effective_conv2d and info.kind in CONV_KINDS and math.prod(info.kernel_size) != 1


def cp_kernel_shape(info: HostInfo, r: int) -> tuple[int, ...]:
    """(r, r, *kernel); PEFT stores a Conv1d kernel as (k, 1)."""
    return (r, r, *info.kernel_size, *((1,) if info.kind == "conv1d" else ()))


def cp_factor(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """Σ_ij core[i, j, …]·out_factor[i, p]·in_factor[j, q] as the matrix (p, q·kernel)."""
    full = torch.einsum("ij...,ip,jq->pq...", core, out_factor, in_factor)
    return full.reshape(full.shape[0], -1)


class LycorisDelta(Delta):
    """Shared by LoHa and LoKr: ΔW as a matrix (out, fan_in), PEFT's rank / module dropout, dense forward."""

    def __init__(self, config: LycorisConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.rank_for(path)
        self.scaling = config.scaling_for(path)

    def matrix(self) -> Tensor:
        """s·ΔW in the matrix view (out, fan_in)."""
        raise NotImplementedError

    def skipped(self) -> bool:
        """Module dropout: while training, the whole delta sits out a step with probability module_dropout."""
        p = self.config.module_dropout
        return self.training and p > 0 and torch.rand(1).item() < p

    def row_mask(self, like: Tensor, rescale: bool) -> Tensor | None:
        """Rank dropout: a (out,) keep-mask while training, else None."""
        if not (self.training and self.config.rank_dropout):
            return None
        draw = torch.rand(self.info.out_features, device=like.device)
        keep = (draw > self.config.rank_dropout).to(like.dtype)
        return keep / keep.mean().clamp_min(1e-12) if rescale else keep

    def rescales_rank_dropout(self) -> bool:
        return True

    @classmethod
    def identity_for(cls, config: LycorisConfig) -> bool:
        return config.init != "random"

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.skipped():
            return y
        matrix = self.matrix()
        mask = self.row_mask(matrix, self.rescales_rank_dropout())
        if mask is not None:
            matrix = matrix * mask.unsqueeze(1)
        return add_dense(x, y, host, from_matrix(self.info, matrix))

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.matrix())


class LohaDelta(LycorisDelta):
    """y = base(x) + s·((B₁A₁) ⊙ (B₂A₂))·x."""

    def __init__(self, config: LohaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(self.r)
        r, out = self.r, info.out_features
        self.effective = effective_conv(config, info)
        if self.effective:
            self.hada_t1 = nn.Parameter(torch.empty(cp_kernel_shape(info, r)))
            self.hada_t2 = nn.Parameter(torch.empty(cp_kernel_shape(info, r)))
            a_shape, b_shape = (r, out), (r, info.in_features)
        else:
            a_shape, b_shape = (out, r), (r, info.fan_in)
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))
        with torch.no_grad():
            kaiming_(*self.parameters())
            if config.init == "default":
                nn.init.zeros_(self.hada_w2_b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """B₁A₁ and B₂A₂ as (out, fan_in) matrices."""
        if self.effective:
            return (cp_factor(self.hada_t1, self.hada_w1_a, self.hada_w1_b),
                    cp_factor(self.hada_t2, self.hada_w2_a, self.hada_w2_b))
        return self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b

    def matrix(self) -> Tensor:
        first, second = self.factors()
        return first * second * self.scaling

    @classmethod
    def num_parameters(cls, config: LohaConfig, info: HostInfo, path: str) -> int:
        r = config.rank_for(path)
        if effective_conv(config, info):  # two CP factors: core r²·kernel plus r·out and r·in each
            return 2 * (r * r * math.prod(info.kernel_size) + r * (info.out_features + info.in_features))
        return 2 * r * (info.out_features + info.fan_in)


# ---- PEFT's LycorisConfig fields ---------------------------------------------------------------------------
_LYCORIS_FIELDS = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "rank_pattern",
                   "alpha_pattern", "init_weights")


def lycoris_peft_format(
    peft_type: str, extra_fields: tuple[str, ...], init_values: dict[str, Any]
) -> PeftFormat:
    """PEFT mapping for a LyCORIS method: the shared fields, `extra_fields` copied as they are, and
    `init_values` mapping our `init` to PEFT's `init_weights`."""
    from_init = {str(v): k for k, v in init_values.items()}

    def to_peft(config) -> dict:
        out = {name: getattr(config, name) for name in _LYCORIS_FIELDS[:-1] + extra_fields}
        out.update(rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern))
        return {**out, "init_weights": init_values[config.init]}

    def from_peft(raw: dict) -> dict:
        refuse_unknown_peft_fields(peft_type, raw, _LYCORIS_FIELDS + extra_fields)
        init = str(raw.get("init_weights", True))
        if init not in from_init:
            raise DeltatuneError(
                f"PEFT {peft_type} init_weights={init!r} is not supported; use one of {list(from_init)}"
            )
        kwargs = {k: raw[k] for k in _LYCORIS_FIELDS[:-1] + extra_fields if raw.get(k) is not None}
        return {**kwargs, "init": from_init[init]}

    return PeftFormat(peft_type, to_peft, from_peft, lambda raw: True)


PAPER = ("FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning "
         "(Hyeon-Woo et al., 2021) https://arxiv.org/abs/2108.06098")
register_method("loha", config=LohaConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS,
                peft=lycoris_peft_format("LOHA", (), {"default": True, "random": False}))(LohaDelta)
