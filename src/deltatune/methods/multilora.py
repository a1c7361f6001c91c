"""MultiLoRA, and the factored-update base class of the low-rank structure family.

MultiLoRA: "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning", Wang et al., 2023,
https://arxiv.org/abs/2311.11501

Update rule (matrix view, W of shape out × in):  W' = W + Σ_{i=1..n} s_i·B_i·A_i — n LoRA modules side by side
("horizontal scaling"), each with its own learnable scalar s_i.
Init: the paper changes LoRA's init to lower the dependency between the two factors: A_i and B_i are both
Kaiming-uniform (a = √5, as LoRA's A) and every s_i starts at 0, so the model is unchanged at step 0 while both
factors already receive gradients.
Shapes: A_i (r, in), B_i (out, r), s (n,). ConvNd hosts use the matrix view: A_i acts as a convolution with the
host's kernel, B_i as a 1×1 convolution. Trainable parameters: n·(r·(in + out) + 1).

`FactoredDelta` (used by several methods of this family) writes ΔW = up·down in the matrix view, with the factors
built by the subclass. It gives every such method a factored forward, `delta_weight`, and a gathered mixed-batch
kernel (one bmm per host, however many adapters a batch mixes).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, per_channel
from ..core.registry import register_method
from ..core.slot import Host


def kaiming_rows(shape: tuple[int, ...]) -> Tensor:
    """LoRA's A init, Kaiming-uniform with a = √5 (bound 1/√fan_in), for a factor whose *last* dim is its fan-in."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound)


def require_positive(method: str, **values: int) -> None:
    """Config check shared by this family: every named size must be > 0."""
    bad = [f"{name} must be > 0 (got {value})" for name, value in values.items() if value <= 0]
    if bad:
        raise DeltatuneError(f"{method}: {', '.join(bad)}; set a positive value")


class FactoredDelta(Delta):
    """A weight delta given as two factors in the matrix view: ΔW = up (out × k) · down (k × fan_in).

    Subclasses implement `factors(host)` (scalings folded into `up`) and may add `delta_bias`.
    """

    gather_while_training = True  # False when forward has side effects the gathered kernel would skip

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """(down (k, fan_in), up (out, k)) of this delta's ΔW in the matrix view."""
        raise NotImplementedError

    def delta_weight(self, host: Host) -> Tensor:
        down, up = self.factors(host)
        return from_matrix(self.info, up @ down)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        down, up = self.factors(host)
        out = y + factored_output(self.info, host, x, down, up).to(y.dtype)
        bias = self.delta_bias(host)
        return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        training = any(d.training for d in deltas) and not cls.gather_while_training
        if host.info.kind in CONV_KINDS or training:
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        out, bias = gathered_output(deltas, slots, x, host)
        if bias is not None:
            out = out + bias.view(bias.shape[0], *([1] * (out.ndim - 2)), bias.shape[1])
        return y + out.to(y.dtype)


def factored_output(info: HostInfo, host: Host, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """up·(down·x) in the host's output layout: linear maps, an embedding lookup, or conv then 1×1 conv."""
    k = down.shape[0]
    if info.kind == "embedding":
        return host.apply(x, down.t()) @ up.t()  # (..., k) @ (k, out)
    if info.kind in CONV_KINDS:
        kernel = down.reshape(k, info.in_features, *info.kernel_size)
        h = host.module._conv_forward(x.to(down.dtype), kernel, None)  # (batch, k, *spatial)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(info.kernel_size) - 1]
        return conv(h, up.reshape(*up.shape, *([1] * len(info.kernel_size))))
    return (x.to(down.dtype) @ down.t()) @ up.t()  # (..., in) -> (..., k) -> (..., out)


def gathered_output(
    deltas: list[FactoredDelta], slots: Tensor, x: Tensor, host: Host
) -> tuple[Tensor, Tensor | None]:
    """Per-row up·down·x for Linear / Conv1D / Embedding: factors zero-padded to one width, stacked with an
    all-zero slot for rows without an adapter, gathered per row, applied with two bmm.

    Returns (output, per-row Δb | None)."""
    pairs = [d.factors(host) for d in deltas]
    width = max(down.shape[0] for down, _ in pairs)
    downs = torch.stack([F.pad(down, (0, 0, 0, width - down.shape[0])) for down, _ in pairs])
    ups = torch.stack([F.pad(up, (0, width - up.shape[1])) for _, up in pairs])
    downs = torch.cat([downs, torch.zeros_like(downs[:1])])  # (K+1, width, fan_in)
    ups = torch.cat([ups, torch.zeros_like(ups[:1])])  # (K+1, out, width)
    idx = torch.where(slots < 0, len(deltas), slots)
    batch, info = x.shape[0], host.info
    if info.kind == "embedding":
        table = downs.transpose(1, 2).reshape(-1, width)  # ((K+1)·vocab, width)
        h = F.embedding(x + (idx * info.in_features).view(batch, *([1] * (x.ndim - 1))), table)
        lead = x.shape
    else:
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(downs.dtype), downs[idx].transpose(1, 2))
        lead = x.shape[:-1]
    out = torch.bmm(h.reshape(batch, -1, width), ups[idx].transpose(1, 2)).reshape(*lead, -1)
    biases = [d.delta_bias(host) for d in deltas]
    if all(b is None for b in biases):
        return out, None
    zero = torch.zeros(info.out_features, dtype=out.dtype, device=out.device)
    stacked = torch.stack([zero if b is None else b for b in biases] + [zero])
    return out, stacked[idx]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiloraConfig(DeltaConfig):
    """Attributes:
    r: rank of each parallel LoRA module.
    n: number of parallel LoRA modules (the paper's horizontal scaling).
    """

    r: int = 8
    n: int = 3

    def validate(self) -> None:
        super().validate()
        require_positive("multilora", r=self.r, n=self.n)


class MultiloraDelta(FactoredDelta):
    """ΔW = Σ_i s_i·B_i·A_i, i.e. up = [s_1·B_1 … s_n·B_n], down = [A_1; …; A_n]."""

    fast_parameters = ("lora_B",)

    def __init__(self, config: MultiloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r)
        n, r = config.n, config.r
        self.lora_A = nn.Parameter(kaiming_rows((n, r, info.fan_in)))
        self.lora_B = nn.Parameter(kaiming_rows((n, info.out_features, r)))
        self.scalings = nn.Parameter(torch.zeros(n))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        n, r = self.config.n, self.config.r
        down = self.lora_A.reshape(n * r, -1)  # [A_1; …; A_n]
        scaled = self.lora_B * self.scalings.view(n, 1, 1)  # (n, out, r)
        up = scaled.permute(1, 0, 2).reshape(self.info.out_features, n * r)  # [s_1·B_1 … s_n·B_n]
        return down, up

    @classmethod
    def num_parameters(cls, config: MultiloraConfig, info: HostInfo, path: str) -> int:
        return config.n * (config.r * (info.fan_in + info.out_features) + 1)


PAPER = "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning (Wang et al., 2023) https://arxiv.org/abs/2311.11501"
register_method("multilora", config=MultiloraConfig, family="low-rank", paper=PAPER)(MultiloraDelta)
