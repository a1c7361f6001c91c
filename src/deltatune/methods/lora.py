"""LoRA and rsLoRA.

- LoRA: "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., 2021, https://arxiv.org/abs/2106.09685
- rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski, 2023,
  https://arxiv.org/abs/2312.03732

Update rule (matrix view, W of shape out × in):  W' = W + s·B·A,  s = alpha / r  (rsLoRA: s = alpha / √r).
Init: A Kaiming-uniform (a = √5), B = 0, so the model is unchanged at step 0. "gaussian": A normal with std 1/r,
B = 0 (as PEFT). "random": A and B both Kaiming-uniform (a non-identity start, for tests and PEFT parity).
Inits read from the base weight ("pissa", "milora", "olora", "nlora", "loftq"; see `lora_init`) or computed from
data by `deltatune.algorithms.inits.initialize` ("eva", "corda_ipm", "corda_kpm", "lora_ga", "lora_one") start A
and B non-zero. The papers subtract s·B₀·A₀ from the base weight; deltatune keeps the base and a frozen copy
(A₀, B₀) instead: ΔW = s·(B·A − B₀·A₀), zero at step 0. Such an adapter is saved as a plain LoRA of rank 2r
relative to the original base, A' = [A; A₀], B' = [B, −B₀] (PEFT's `path_initial_model_for_weight_conversion`).
Shapes: Linear / Conv1D A (r, in), B (out, r); Embedding A (r, vocab), B (dim, r); ConvNd A (r, in, *k),
B (out, r, 1, ..., 1) — A is a convolution with the host's kernel, stride and padding, B a 1×1 convolution.
Options: dropout on the LoRA input; `lora_bias` adds a trainable bias to B (PEFT's lora_B.bias); `bias="lora_only"`
trains a bias update for every adapted layer that has a bias (saved as PEFT saves it: the full bias
`<module>.base_layer.bias`); `rank_pattern` / `alpha_pattern` set r / alpha per module (PEFT's regex rule).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, per_channel, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_rank_and_dropout, down_project, fuse_update, kaiming_
from .lora_init import DATA_FREE, WITH_OFFSET, check_init_options, data_free_factors
from .lora_peft import lora_peft_format

LoraInit = Literal["default", "gaussian", "random", "pissa", "milora", "olora", "nlora", "loftq", "eva", "corda_ipm",
                   "corda_kpm", "lora_ga", "lora_one"]


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rule: the first key that matches the end of the module path (as a regex) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(DeltaConfig):
    """Attributes:
    r: rank of the update.
    alpha: scaling numerator (s = alpha / r, or alpha / √r with use_rslora).
    dropout: dropout probability on the LoRA branch's input.
    use_rslora: rank-stabilised scaling alpha / √r.
    init: "default" (Kaiming A, zero B), "gaussian" (N(0, 1/r) A, zero B), "random" (non-zero B; tests), a
        data-free init read from the base weight (pissa, milora, olora, nlora, loftq) or a data-driven one that
        `deltatune.algorithms.inits.initialize` computed (eva, corda_ipm, corda_kpm, lora_ga, lora_one).
    bias: "none" or "lora_only" (train a bias update on adapted layers that have a bias).
    lora_bias: add a trainable bias to B.
    rank_pattern: module-path regex -> rank, overriding r.
    alpha_pattern: module-path regex -> alpha, overriding alpha.
    init_options: options of the data-free init (pissa: niter; nlora: seed; loftq: bits, iters, quantizer,
        block_size).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: LoraInit = "default"
    bias: Literal["none", "lora_only"] = "none"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout, self.rank_pattern)
        check_init_options(self.method, self.init, self.init_options)

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        r = self.rank_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclasses.dataclass(frozen=True, kw_only=True)
class RsloraConfig(LoraConfig):
    """LoRA with rank-stabilised scaling on by default."""

    use_rslora: bool = True


_AB_KEYS = ("lora_A.weight", "lora_B.weight")


def lora_shapes(info: HostInfo, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if info.kind in CONV_KINDS:
        ones = (1,) * len(info.kernel_size)
        return (r, info.in_features, *info.kernel_size), (info.out_features, r, *ones)
    return (r, info.in_features), (info.out_features, r)


def lora_matrix(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """s·B·A in the matrix view (out, fan_in)."""
    r = lora_a.shape[0]
    return (lora_b.reshape(-1, r) @ lora_a.reshape(r, -1)) * scaling


class LoraDelta(FactoredDelta):
    """y = base(x) + s·B(A(dropout(x))) (+ Δb), or s·(B·A − B₀·A₀) with an init that starts non-zero.

    A factored delta (down = A, up = s·B in the matrix view) with its own forward: convolutions run A as a real
    convolution with the host's kernel and B as a 1×1 one, and the scaling rides on the fused addmm. Mixed batches
    use the shared gathered kernel (`FactoredDelta.per_row`). With an offset, A and B are concatenated with the frozen
    A₀ and −B₀ (rank 2r), so every path stays one low-rank product."""

    fast_parameters = ("lora_B",)

    def __init__(self, config: LoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.rank_for(path)
        self.check_rank(self.r)
        if config.lora_bias and info.kind == "embedding":
            raise DeltatuneError(
                f"{config.method}: lora_bias is not available on embedding {path!r} (an embedding has no bias to "
                "merge into); exclude embeddings or set lora_bias=False"
            )
        self.scaling = config.scaling_for(path)
        self.dropout = config.dropout
        a_shape, b_shape = lora_shapes(info, self.r)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.empty(b_shape))
        out = info.out_features
        self.lora_B_bias = nn.Parameter(torch.zeros(out)) if config.lora_bias else None
        self.bias_delta = nn.Parameter(torch.zeros(out)) if config.bias == "lora_only" and info.has_bias else None
        with_offset = config.init in WITH_OFFSET  # frozen start (A₀, B₀), saved inside the rank-2r factors
        if with_offset:
            self._check_offset_applies()
        self.register_buffer("offset_A", torch.zeros(a_shape) if with_offset else None, persistent=False)
        self.register_buffer("offset_B", torch.zeros(b_shape) if with_offset else None, persistent=False)
        self.reset_parameters(config.init)

    def _check_offset_applies(self) -> None:
        """Inits with a frozen start need the plain B·A product (DoRA keeps it; KaSA's ΔΣ does not)."""
        if type(self).factors is not LoraDelta.factors or type(self).down is not LoraDelta.down:
            raise DeltatuneError(f"{self.config.method}: init={self.config.init!r} is only available for LoRA, rsLoRA, "
                                 "DoRA and methods built on their B·A product; use init='default'")

    def reset_parameters(self, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                kaiming_(self.lora_A)
            if init == "random":
                kaiming_(self.lora_B)
            else:
                nn.init.zeros_(self.lora_B)

    def setup(self, host: Host) -> None:
        if self.config.init in DATA_FREE:
            weight = to_matrix(self.info, host.weight()).detach()
            down, up = data_free_factors(self.config.init, weight, self.r, self.scaling, self.config.init_options,
                                         self.path)
            self.set_start(down, up)

    def set_start(self, down: Tensor, up: Tensor) -> None:
        """Start from A = down (r, fan_in), B = up (out, r) in the matrix view; with an offset the delta stays zero."""
        with torch.no_grad():
            self.lora_A.copy_(down.reshape(self.lora_A.shape))
            self.lora_B.copy_(up.reshape(self.lora_B.shape))
            if self.offset_A is not None:
                self.offset_A.copy_(self.lora_A)
                self.offset_B.copy_(self.lora_B)

    def ab(self) -> tuple[Tensor, Tensor]:
        """(A, B) in the host layout, concatenated with the frozen (A₀, −B₀) when the init starts non-zero."""
        if self.offset_A is None:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.offset_A]), torch.cat([self.lora_B, -self.offset_B], dim=1)

    # ---- math ---------------------------------------------------------------------------------------------------
    def down(self, x: Tensor, host: Host) -> Tensor:
        """A(x): (..., r) for Linear / Conv1D / Embedding, (batch, r, *spatial) for convolutions (2r with an
        offset)."""
        lora_a = self.ab()[0]
        if self.info.kind in CONV_KINDS:
            return host.module._conv_forward(x.to(lora_a.dtype), lora_a, None)
        return down_project(x, lora_a, host)

    def lora_output(self, x: Tensor, host: Host) -> Tensor:
        """s·B(A(x)) in the host's output layout (x already dropped out), without bias terms."""
        h = self.down(x, host)
        lora_b = self.ab()[1]
        if self.info.kind in CONV_KINDS:
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.info.kernel_size) - 1]
            return conv(h, lora_b) * self.scaling
        return F.linear(h, lora_b) * self.scaling

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        bias = self.delta_bias(host)
        if self.info.kind in CONV_KINDS:
            out = y + self.lora_output(self.dropped(x), host).to(y.dtype)
            return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)
        # y + s·h·Bᵀ as one fused addmm, in place when allowed (see Host.may_overwrite).
        return fuse_update(y, self.down(self.dropped(x), host), self.ab()[1], host, self.scaling, bias)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        lora_a, lora_b = self.ab()
        k = lora_a.shape[0]
        return lora_a.reshape(k, -1), lora_b.reshape(-1, k) * self.scaling

    def update_matrix(self) -> Tensor:
        """s·B·A (− s·B₀·A₀) in the matrix view (out, fan_in)."""
        return lora_matrix(*self.ab(), self.scaling)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.update_matrix())

    def delta_bias(self, host: Host) -> Tensor | None:
        parts = []
        if self.lora_B_bias is not None:
            parts.append(self.lora_B_bias * self.scaling)
        if self.bias_delta is not None:
            parts.append(self.bias_delta)
        return sum(parts) if parts else None

    @classmethod
    def num_parameters(cls, config: LoraConfig, info: HostInfo, path: str) -> int:
        r = config.rank_for(path)
        count = r * (info.fan_in + info.out_features)
        count += info.out_features if config.lora_bias else 0
        count += info.out_features if config.bias == "lora_only" and info.has_bias else 0
        return count

    # ---- on disk: PEFT's tensor names ---------------------------------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if self.info.kind == "embedding" else _AB_KEYS
        lora_a, lora_b = self.ab()  # with an offset: the rank-2r plain LoRA relative to the original base
        out = {a_key: lora_a, b_key: lora_b}
        if self.lora_B_bias is not None:
            out["lora_B.bias"] = self.lora_B_bias
        if self.bias_delta is not None:  # PEFT stores the trained bias itself
            out["base_layer.bias"] = host.bias().to(self.bias_delta.dtype) + self.bias_delta
        return {k: v.detach() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        targets = {"lora_B.bias": self.lora_B_bias}
        with torch.no_grad():
            for key, value in tensors.items():
                if key == "base_layer.bias":
                    self.bias_delta.copy_(value - host.bias().to(value.dtype))
                elif key in ("lora_A.weight", "lora_embedding_A"):
                    self._load_factor(value, self.lora_A, self.offset_A, dim=0)
                elif key in ("lora_B.weight", "lora_embedding_B"):
                    self._load_factor(value, self.lora_B, self.offset_B, dim=1, sign=-1.0)
                else:
                    targets[key].copy_(value)

    def _load_factor(self, value: Tensor, trained: Tensor, offset: Tensor | None, dim: int, sign: float = 1.0) -> None:
        if offset is None:
            trained.copy_(value)
            return
        first, second = value.split(self.r, dim=dim)
        trained.copy_(first)
        offset.copy_(second * sign)


PAPER_LORA = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021) https://arxiv.org/abs/2106.09685"
PAPER_RSLORA = "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (Kalajdzievski, 2023) https://arxiv.org/abs/2312.03732"

register_method("lora", config=LoraConfig, family="low-rank", paper=PAPER_LORA, peft=lora_peft_format(dora=False))(
    LoraDelta
)


# rsLoRA is LoRA's math with another scaling default: same delta class, so both share one gathered kernel.
register_method(
    "rslora", config=RsloraConfig, family="low-rank", paper=PAPER_RSLORA, peft=lora_peft_format(dora=False, claims=False)
)(LoraDelta)
