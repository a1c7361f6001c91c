"""LoRA and rsLoRA.

- LoRA: "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., 2021, https://arxiv.org/abs/2106.09685
- rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski, 2023,
  https://arxiv.org/abs/2312.03732

Update rule (matrix view, W of shape out × in):  W' = W + s·B·A,  s = alpha / r  (rsLoRA: s = alpha / √r).
Init: A Kaiming-uniform (a = √5), B = 0, so the model is unchanged at step 0. "gaussian": A normal with std 1/r,
B = 0 (as PEFT). "random": A and B both Kaiming-uniform (a non-identity start, for tests and PEFT parity).
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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, per_channel
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_rank_and_dropout, down_project, fuse_update, kaiming_
from .lora_peft import lora_peft_format


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
    init: "default" (Kaiming A, zero B), "gaussian" (N(0, 1/r) A, zero B) or "random" (non-zero B; tests).
    bias: "none" or "lora_only" (train a bias update on adapted layers that have a bias).
    lora_bias: add a trainable bias to B.
    rank_pattern: module-path regex -> rank, overriding r.
    alpha_pattern: module-path regex -> alpha, overriding alpha.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: Literal["default", "gaussian", "random"] = "default"
    bias: Literal["none", "lora_only"] = "none"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout, self.rank_pattern)

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
    """y = base(x) + s·B(A(dropout(x))) (+ Δb).

    A factored delta (down = A, up = s·B in the matrix view) with its own forward: convolutions run A as a real
    convolution with the host's kernel and B as a 1×1 one, and the scaling rides on the fused addmm. Mixed batches
    use the shared gathered kernel (`FactoredDelta.per_row`)."""

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
        self.reset_parameters(config.init)

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

    # ---- math ---------------------------------------------------------------------------------------------------
    def down(self, x: Tensor, host: Host) -> Tensor:
        """A(x): (..., r) for Linear / Conv1D / Embedding, (batch, r, *spatial) for convolutions."""
        if self.info.kind in CONV_KINDS:
            return host.module._conv_forward(x.to(self.lora_A.dtype), self.lora_A, None)
        return down_project(x, self.lora_A, host)

    def lora_output(self, x: Tensor, host: Host) -> Tensor:
        """s·B(A(x)) in the host's output layout (x already dropped out), without bias terms."""
        h = self.down(x, host)
        if self.info.kind in CONV_KINDS:
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.info.kernel_size) - 1]
            return conv(h, self.lora_B) * self.scaling
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        bias = self.delta_bias(host)
        if self.info.kind in CONV_KINDS:
            out = y + self.lora_output(self.dropped(x), host).to(y.dtype)
            return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)
        # y + s·h·Bᵀ as one fused addmm, in place when allowed (see Host.may_overwrite).
        return fuse_update(y, self.down(self.dropped(x), host), self.lora_B, host, self.scaling, bias)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.lora_A.reshape(self.r, -1), self.lora_B.reshape(-1, self.r) * self.scaling

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, lora_matrix(self.lora_A, self.lora_B, self.scaling))

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
        out = {a_key: self.lora_A, b_key: self.lora_B}
        if self.lora_B_bias is not None:
            out["lora_B.bias"] = self.lora_B_bias
        if self.bias_delta is not None:  # PEFT stores the trained bias itself
            out["base_layer.bias"] = host.bias().to(self.bias_delta.dtype) + self.bias_delta
        return {k: v.detach() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        targets = {
            "lora_A.weight": self.lora_A,
            "lora_embedding_A": self.lora_A,
            "lora_B.weight": self.lora_B,
            "lora_embedding_B": self.lora_B,
            "lora_B.bias": self.lora_B_bias,
        }
        with torch.no_grad():
            for key, value in tensors.items():
                if key == "base_layer.bias":
                    self.bias_delta.copy_(value - host.bias().to(value.dtype))
                else:
                    targets[key].copy_(value)


PAPER_LORA = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021) https://arxiv.org/abs/2106.09685"
PAPER_RSLORA = "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (Kalajdzievski, 2023) https://arxiv.org/abs/2312.03732"

register_method("lora", config=LoraConfig, family="low-rank", paper=PAPER_LORA, peft=lora_peft_format(dora=False))(
    LoraDelta
)


# rsLoRA is LoRA's math with another scaling default: same delta class, so both share one gathered kernel.
register_method(
    "rslora", config=RsloraConfig, family="low-rank", paper=PAPER_RSLORA, peft=lora_peft_format(dora=False, claims=False)
)(LoraDelta)
