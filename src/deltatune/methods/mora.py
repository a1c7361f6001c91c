"""MoRA: "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", Jiang et al., 2024,
https://arxiv.org/abs/2405.12130

One square trainable matrix M (r̂ × r̂) between two fixed, parameter-free operators:
    Δh = f_decomp(M · f_comp(x)),   r̂ = ⌊√((in + out)·r) + ½⌋,
so M has about as many parameters as a rank-r LoRA ((in + out)·r) but ΔW can reach rank well above r.
Operators (x of length in, padded cyclically to n·r̂ with n = ⌈in / r̂⌉, i.e. x̃_p = x_{p mod in}):
- "rotation" (default; the paper's Eq. 9, which its authors use for small r): cut x̃ into n segments x̃_b of length
  r̂, rotate segment b by the RoPE rotation R_b (angle b·θ_j on dims (j, j + r̂/2), θ_j = 10000^(−2j/r̂)), apply M
  to each, concatenate: ΔW = blockdiag(M·R_0, …, M·R_{n−1}) with its columns folded mod `in`. r̂ is rounded down
  to an even number so the rotation pairs dims.
- "sharing" (the paper's Eq. 6, for large r): sum the n segments (compress), tile M's output (decompress).
Both decompress by cyclic indexing: output row i reads flat row i mod (length of M's output).
Init: M = 0, so the model is unchanged at step 0. Both operators are linear, so ΔW is a weight and merges.
Shapes: M (r̂, r̂) over the matrix view (ConvNd / Embedding: `in` is fan_in / vocabulary; those hosts apply the
materialised ΔW). Trainable parameters: r̂².
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import check_positive


def square_size(r: int, fan_in: int, out: int, operator: str) -> int:
    """r̂ = ⌊√((in + out)·r) + ½⌋, rounded down to even for the rotation operator."""
    side = int(math.sqrt((fan_in + out) * r) + 0.5)
    return side - side % 2 if operator == "rotation" else side


def rope_tables(blocks: int, side: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles b·θ_j of every segment b: (blocks, side), columns [θ_0..θ_{h-1}, θ_0..θ_{h-1}]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, side, 2, dtype=torch.float64) / side))
    angles = torch.outer(torch.arange(blocks, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(v: Tensor) -> Tensor:
    half = v.shape[-1] // 2
    return torch.cat([-v[..., half:], v[..., :half]], dim=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoraConfig(DeltaConfig):
    """Attributes:
    r: the LoRA rank whose parameter budget M matches; r̂ = ⌊√((in + out)·r) + ½⌋.
    operator: "rotation" (segments rotated then transformed, Eq. 9) or "sharing" (segments summed, Eq. 6).
    """

    r: int = 8
    operator: Literal["rotation", "sharing"] = "rotation"

    def validate(self) -> None:
        super().validate()
        check_positive("mora", r=self.r)


class MoraDelta(Delta):
    """Δh = f_decomp(M·f_comp(x)) with parameter-free compress / decompress operators."""

    def __init__(self, config: MoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        side = square_size(config.r, info.fan_in, info.out_features, config.operator)
        if side < 2:
            raise DeltatuneError(
                f"mora: r̂ = {side} at {path!r} is too small for the {config.operator} operator; raise r")
        self.side = side
        self.blocks = -(-info.fan_in // side)  # n = ⌈in / r̂⌉
        self.M = nn.Parameter(torch.zeros(side, side))
        flat = self.blocks * side if config.operator == "rotation" else side  # length of M's joined output
        self.register_buffer("in_index", torch.arange(self.blocks * side) % info.fan_in, persistent=False)
        self.register_buffer("out_index", torch.arange(info.out_features) % flat, persistent=False)
        cos, sin = rope_tables(self.blocks, side)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def operator(self, x: Tensor) -> Tensor:
        """f_decomp(M·f_comp(x)) for x of shape (..., in): (..., out)."""
        padded = x.to(self.M.dtype)[..., self.in_index]  # (..., n·r̂), cyclic padding
        segments = padded.unflatten(-1, (self.blocks, self.side))  # (..., n, r̂)
        if self.config.operator == "sharing":
            flat = segments.sum(-2) @ self.M.t()  # (..., r̂)
        else:
            rotated = segments * self.cos + rotate_half(segments) * self.sin
            flat = (rotated @ self.M.t()).flatten(-2)  # (..., n·r̂)
        return flat[..., self.out_index]

    def matrix(self) -> Tensor:
        """ΔW in the matrix view (out × in), built from M without an in × in identity."""
        cols = self.in_index.view(self.blocks, self.side)  # input column of each (segment, position)
        if self.config.operator == "sharing":
            folded = self.M.new_zeros(self.side, self.info.fan_in)
            positions = torch.arange(self.blocks * self.side, device=self.M.device) % self.side
            folded.index_add_(1, self.in_index, self.M[:, positions])
            return folded[self.out_index]
        # Segment b maps through G_b = M·R_b, R_b = diag(cos_b) + diag(sin_b)·(rotate_half as a matrix).
        rot = rotate_half(torch.eye(self.side, dtype=self.M.dtype, device=self.M.device)).t()
        per_block = self.M @ (torch.diag_embed(self.cos) + self.sin.unsqueeze(-1) * rot)  # (n, r̂, r̂)
        segment, row = self.out_index // self.side, self.out_index % self.side
        values = per_block[segment, row]  # (out, r̂): output row i reads segment b, row j of G_b
        delta = self.M.new_zeros(self.info.out_features, self.info.fan_in)
        return delta.scatter_add(1, cols[segment], values)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.matrix())

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS:  # embeddings / convolutions apply the materialised ΔW
            return super().forward(x, y, host)
        return y + self.operator(x).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: MoraConfig, info: HostInfo, path: str) -> int:
        side = int(math.sqrt((info.fan_in + info.out_features) * config.r) + 0.5)
        if config.operator == "rotation":
            side -= side % 2
        return side * side


PAPER = "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (Jiang et al., 2024) https://arxiv.org/abs/2405.12130"
register_method("mora", config=MoraConfig, family="low-rank", paper=PAPER)(MoraDelta)
