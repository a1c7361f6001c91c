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
    def down(self, x: Tensor, host: Host) -> Tensor:
        """A(x): (..., r) for Linear / Conv1D / Embedding, (batch, r, *spatial) for convolutions."""
        if self.info.kind == "embedding":
            return host.apply(x, self.lora_A.t())
        if self.info.kind in CONV_KINDS:
            return host.module._conv_forward(x.to(self.lora_A.dtype), self.lora_A, None)
        return F.linear(x.to(self.lora_A.dtype), self.lora_A)

    def lora_output(self, x: Tensor, host: Host) -> Tensor:
        """s·B(A(x)) in the host's output layout (x already dropped out), without bias terms."""
        h = self.down(x, host)
        if self.info.kind in CONV_KINDS:
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.info.kernel_size) - 1]
            return conv(h, self.lora_B) * self.scaling
        return F.linear(h, self.lora_B) * self.scaling

    def dropped(self, x: Tensor) -> Tensor:
        if self.dropout and self.training and self.info.kind != "embedding":
            return F.dropout(x, self.dropout, training=True)
        return x

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        bias = self.delta_bias(host)
        if self.info.kind in CONV_KINDS:
            out = y + self.lora_output(self.dropped(x), host).to(y.dtype)
            return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)
        # y + s·h·Bᵀ as one fused addmm in y's dtype (bf16 under autocast), in place when allowed
        # (see Host.may_overwrite); gradients still reach the float32 factors through the casts.
        h = self.down(self.dropped(x), host).reshape(-1, self.r).to(y.dtype)
        flat = y.view(-1, y.shape[-1]) if host.may_overwrite(y) else y.reshape(-1, y.shape[-1]).clone()
        flat.addmm_(h, self.lora_B.t().to(y.dtype), alpha=self.scaling)
        if bias is not None:
            flat.add_(bias.to(y.dtype))
        return flat.view(y.shape)

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
        if not gatherable(deltas, host):
            return super().per_row(deltas, slots, x, y, host, cache)
        if host.info.kind in CONV_KINDS or y.dtype != deltas[0].lora_A.dtype:
            lora, bias = cls.gathered_output(deltas, slots, x, host, cache)
            if bias is not None:
                lora = lora + rows_per_channel(host.info, bias, lora.ndim)
            return y + lora.to(y.dtype)
        # y + h·B_rowᵀ as one batched baddbmm, in place when allowed.
        h, b_rows, bias = cls.gathered_factors(deltas, slots, x, host, cache)
        batch = y.shape[0]
        flat = y.view(batch, -1, y.shape[-1]) if host.may_overwrite(y) else y.reshape(batch, -1, y.shape[-1]).clone()
        flat.baddbmm_(h, b_rows.transpose(1, 2))
        if bias is not None:
            flat.add_(bias.unsqueeze(1))
        return flat.view(y.shape)

    @classmethod
    def gathered_factors(cls, deltas, slots, x, host, cache) -> tuple[Tensor, Tensor, Tensor | None]:
        """For Linear / Conv1D / Embedding: per-row A(x) (batch, tokens, r), per-row s·B (batch, out, r) and
        per-row Δb (batch, out) | None. Rows whose slot is -1 use an all-zero slot.

        The work is a gather and a batched matmul, proportional to the batch whatever the number of adapters.
        """
        idx, a, a_rows, b_rows, bias_rows = _row_factors(deltas, slots, host, cache)
        batch, rank = x.shape[0], a.shape[1]
        if host.info.kind == "embedding":
            table = a.transpose(1, 2).reshape(-1, rank)  # ((K+1)·vocab, r)
            h = F.embedding(x + (idx * host.info.in_features).view(batch, *([1] * (x.ndim - 1))), table)
        else:
            h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a.dtype), a_rows.transpose(1, 2))
        return h.reshape(batch, -1, rank), b_rows, bias_rows

    @classmethod
    def gathered_output(cls, deltas, slots, x, host, cache) -> tuple[Tensor, Tensor | None]:
        """Per-row s·B(A(x)) in the host's output layout and per-row Δb (batch, out) | None."""
        info = host.info
        if info.kind not in CONV_KINDS:
            h, b_rows, bias_rows = cls.gathered_factors(deltas, slots, x, host, cache)
            out = torch.bmm(h, b_rows.transpose(1, 2))
            lead = x.shape if info.kind == "embedding" else x.shape[:-1]
            return out.reshape(*lead, -1), bias_rows
        _, a, a_rows, b_rows, bias_rows = _row_factors(deltas, slots, host, cache)
        batch, rank, module = x.shape[0], a.shape[1], host.module
        # Grouped convolutions with one group per row: each row convolved with its own adapter's factors.
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(info.kernel_size) - 1]
        a_rows = a_rows.reshape(batch * rank, info.in_features, *info.kernel_size)
        h = conv(x.reshape(1, -1, *x.shape[2:]).to(a.dtype), a_rows, None, module.stride, module.padding,
                 module.dilation, batch)  # (1, batch·r, *spatial)
        b_rows = b_rows.reshape(batch * info.out_features, rank, *([1] * len(info.kernel_size)))
        out = conv(h, b_rows, None, 1, 0, 1, batch)
        return out.reshape(batch, info.out_features, *out.shape[2:]), bias_rows


def gatherable(deltas: list["LoraDelta"], host: Host) -> bool:
    """The gathered kernel covers inference and dropout-free training; else each adapter runs on its rows."""
    if any(d.training and d.dropout for d in deltas):
        return False
    return host.info.kind not in CONV_KINDS or host.module.padding_mode == "zeros"


def rows_per_channel(info: HostInfo, rows: Tensor, ndim: int) -> Tensor:
    """Shape per-row vectors (batch, out) to broadcast against a host output with `ndim` dims."""
    if info.channel_dim == 1:
        return rows.view(*rows.shape, *([1] * (ndim - 2)))
    return rows.view(rows.shape[0], *([1] * (ndim - 2)), rows.shape[1])


def _row_factors(deltas: list[LoraDelta], slots: Tensor, host: Host, cache: dict) -> tuple:
    """(slot per row, stacked A, A per row, s·B per row, Δb per row | None).

    Without gradients they are cached: the stack across routing changes (keyed by the deltas and their parameters'
    version counters, so a load or an optimizer step invalidates it), the per-row gathers for this routing.
    While training, parameters change between steps and everything is rebuilt inside the graph.
    """
    rows = cache.get("lora_rows")
    if rows is not None:
        return rows
    if torch.is_grad_enabled():
        a, b, bias = _stack(deltas, host)
    else:
        store = cache["kernel_cache"]
        key = tuple((id(d), *(p._version for p in d.parameters())) for d in deltas)
        if store.get("key") != key:
            store["key"], store["stack"] = key, _stack(deltas, host)
        a, b, bias = store["stack"]
    idx = torch.where(slots < 0, len(deltas), slots)
    rows = (idx, a, a[idx], b[idx], None if bias is None else bias[idx])
    if not torch.is_grad_enabled():
        cache["lora_rows"] = rows
    return rows


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
