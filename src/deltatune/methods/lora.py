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
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, per_channel
from ..core.registry import register_method
from ..core.slot import Host
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
        if self.r <= 0 or any(v <= 0 for v in self.rank_pattern.values()):
            raise DeltatuneError(f"{self.method}: r must be > 0, got r={self.r}, rank_pattern={self.rank_pattern}")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltatuneError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")

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


class LoraDelta(Delta):
    """y = base(x) + s·B(A(dropout(x))) (+ Δb)."""

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
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    # ---- math ---------------------------------------------------------------------------------------------------
    def lora_output(self, x: Tensor, host: Host) -> Tensor:
        """s·B(A(x)) in the host's output layout (x already dropped out), without bias terms."""
        kind = self.info.kind
        if kind == "embedding":
            h = host.apply(x, self.lora_A.t())
            return F.linear(h, self.lora_B) * self.scaling
        if kind in CONV_KINDS:
            h = host.module._conv_forward(x.to(self.lora_A.dtype), self.lora_A, None)
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.info.kernel_size) - 1]
            return conv(h, self.lora_B) * self.scaling
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return F.linear(h, self.lora_B) * self.scaling

    def dropped(self, x: Tensor) -> Tensor:
        if self.dropout and self.training and self.info.kind != "embedding":
            return F.dropout(x, self.dropout, training=True)
        return x

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        out = y + self.lora_output(self.dropped(x), host).to(y.dtype)
        bias = self.delta_bias(host)
        return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)

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

    # ---- mixed batches: one gathered bmm per host, whatever the number of adapters ------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if host.info.kind in CONV_KINDS or any(d.training and d.dropout for d in deltas):
            return super().per_row(deltas, slots, x, y, host, cache)
        lora, bias = cls.gathered_output(deltas, slots, x, host, cache)
        if bias is not None:
            lora = lora + bias.view(bias.shape[0], *([1] * (lora.ndim - 2)), bias.shape[1])
        return y + lora.to(y.dtype)

    @classmethod
    def gathered_output(cls, deltas, slots, x, host, cache) -> tuple[Tensor, Tensor | None]:
        """Per-row s·B(A(x)) (batch, ..., out) and per-row Δb (batch, out) | None; rows with slot -1 get zeros."""
        stack = cache.get("lora_stack")
        if stack is None:
            stack = _stack(deltas, host)
            if not torch.is_grad_enabled():  # parameters may change between training steps
                cache["lora_stack"] = stack
        a, b, bias = stack
        idx = torch.where(slots < 0, len(deltas), slots)
        batch = x.shape[0]
        if host.info.kind == "embedding":
            vocab = host.info.in_features
            table = a.transpose(1, 2).reshape(-1, a.shape[1])  # ((K+1)·vocab, r)
            h = F.embedding(x + (idx * vocab).view(batch, *([1] * (x.ndim - 1))), table)
            lead = x.shape
        else:
            h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a.dtype), a[idx].transpose(1, 2))
            lead = x.shape[:-1]
        out = torch.bmm(h.reshape(batch, -1, a.shape[1]), b[idx].transpose(1, 2))  # (batch, tokens, out)
        return out.reshape(*lead, -1), (None if bias is None else bias[idx])


def _stack(deltas: list[LoraDelta], host: Host) -> tuple[Tensor, Tensor, Tensor | None]:
    """A (K+1, r_max, in), s·B (K+1, out, r_max), Δb (K+1, out) | None; the last slot is all zeros (no adapter)."""
    r_max = max(d.r for d in deltas)
    ref = deltas[0].lora_A
    a = [F.pad(d.lora_A.reshape(d.r, -1), (0, 0, 0, r_max - d.r)) for d in deltas]
    b = [F.pad(d.lora_B.reshape(-1, d.r) * d.scaling, (0, r_max - d.r)) for d in deltas]
    a.append(torch.zeros_like(a[0]))
    b.append(torch.zeros_like(b[0]))
    biases = [d.delta_bias(host) for d in deltas]
    bias = None
    if any(v is not None for v in biases):
        zero = torch.zeros(host.info.out_features, dtype=ref.dtype, device=ref.device)
        bias = torch.stack([v if v is not None else zero for v in biases] + [zero])
    return torch.stack(a), torch.stack(b), bias


PAPER_LORA = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021) https://arxiv.org/abs/2106.09685"
PAPER_RSLORA = "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (Kalajdzievski, 2023) https://arxiv.org/abs/2312.03732"

register_method("lora", config=LoraConfig, family="low-rank", paper=PAPER_LORA, peft=lora_peft_format(dora=False))(
    LoraDelta
)


# rsLoRA is LoRA's math with another scaling default: same delta class, so both share one gathered kernel.
register_method(
    "rslora", config=RsloraConfig, family="low-rank", paper=PAPER_RSLORA, peft=lora_peft_format(dora=False, claims=False)
)(LoraDelta)
