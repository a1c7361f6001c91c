"""BOFT: "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", Liu et al., 2023,
https://arxiv.org/abs/2311.06243 (PEFT's layout; the pure-torch path, no CUDA kernel needed).

Update rule (matrix view W of shape out × fan_in):  W' = diag(s)·W·Bᵀ,  B = M_m ⋯ M_2·M_1,
each butterfly factor M_i = P_i·diag(R_i1, ..., R_in)·P_iᵀ: n = fan_in / b orthogonal blocks R_ij = Cayley(S_ij),
S_ij = (A_ij − A_ijᵀ)/2 (exact Cayley (I − S)(I + S)⁻¹), and P_i the butterfly permutation of factor i: within each
group of b·2^(i−1) coordinates, the half-blocks of b/2 coordinates are reordered even-indexed first, then odd (P_1 = I).
So the input is rotated by a product of m sparse orthogonal matrices (y = s ⊙ W·Bᵀx): B is orthogonal and dense
over groups of b·2^(m−1) coordinates, and diag(s) rescales the output channels.
With m = 1, BOFT is block-diagonal OFT (plus the scale s).
Init: A = 0 and s = 1, so B = I and the model is unchanged ("random": A ~ N(0, 0.1²), s ~ N(1, 0.1²)).
Shapes: boft_R (m, n, b, b) full matrices as PEFT stores them (the paper's free parameters are their
m·n·b(b−1)/2 skew parts), boft_s (out, 1) — (1, out) on convolutions. `dropout` replaces a random fraction of one
random factor's blocks by the identity while training (PEFT's multiplicative dropout).
Give either block_size or block_num; m > 1 needs even b and n with fan_in divisible by b·2^(m−1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .oft import cayley, check_exactly_one, mapped_peft_format, times_block_diagonal


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoftConfig(DeltaConfig):
    """Attributes:
    block_size: size b of each orthogonal block; 0 derives it from block_num (give exactly one of the two).
    block_num: number n of blocks per butterfly factor; 0 derives it from block_size.
    n_butterfly_factor: number m of butterfly factors (1 = block-diagonal OFT).
    dropout: probability of replacing a block of one random factor by the identity while training.
    init: "identity" (A = 0, s = 1: the model is unchanged) or "random" (tests).
    """

    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        super().validate()
        check_exactly_one(self.method, block_size=self.block_size, block_num=self.block_num)
        if self.n_butterfly_factor < 1:
            raise DeltatuneError(f"{self.method}: n_butterfly_factor must be >= 1, got {self.n_butterfly_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltatuneError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")


def butterfly_shape(config: BoftConfig, info: HostInfo, path: str) -> tuple[int, int]:
    """(block size b, blocks per factor n) on this layer, or an error saying which constraint fails."""
    dim, factors = info.fan_in, config.n_butterfly_factor
    given = config.block_size or config.block_num
    if dim % given:
        what = "block_size" if config.block_size else "block_num"
        raise DeltatuneError(f"{config.method}: {what}={given} does not divide the {dim} inputs of {path!r}; "
                             f"pick a divisor of {dim} or exclude the module")
    b, n = (given, dim // given) if config.block_size else (dim // given, given)
    span = b * 2 ** (factors - 1)
    if factors > 1 and (dim % span or b % 2 or n % 2):
        raise DeltatuneError(
            f"{config.method}: {factors} butterfly factors need an even block size b={b} and block count n={n} with "
            f"b·2^{factors - 1}={span} dividing the {dim} inputs of {path!r}; lower n_butterfly_factor or change b"
        )
    return b, n


def butterfly_permutation(dim: int, group: int, half_block: int) -> Tensor:
    """Index map of one butterfly factor: inside each group of `group` coordinates the chunks of `half_block`
    coordinates are reordered even-indexed first, then odd-indexed (entry j is the source of coordinate j)."""
    chunks = group // half_block
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(k * half_block, (k + 1) * half_block) for k in order])
    return torch.cat([start + within for start in range(0, dim, group)])


def identity_dropout(blocks: Tensor, p: float) -> Tensor:
    """Replace int(p·n) random blocks of one random factor by the identity (blocks: (m, n, b, b))."""
    m, n, b, _ = blocks.shape
    count = int(p * n)
    if count == 0:
        return blocks
    mask = blocks.new_zeros(m, n, 1, 1)
    mask[torch.randint(m, ()).item(), torch.randperm(n, device=blocks.device)[:count]] = 1.0
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return blocks * (1 - mask) + eye * mask


class BoftDelta(Delta):
    """y = base(x) + (diag(s)·W·Bᵀ − W)·x with B the orthogonal butterfly product."""

    uses_base_weight = True

    def __init__(self, config: BoftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        b, n = butterfly_shape(config, info, path)
        factors = config.n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(factors, n, b, b))
        self.boft_s = nn.Parameter(torch.ones(info.out_features))
        dim = info.fan_in
        perms = [butterfly_permutation(dim, b * 2**i, b // 2) if factors > 1 else torch.arange(dim)
                 for i in range(factors)]
        self.register_buffer("perm", torch.stack(perms), persistent=False)
        self.register_buffer("inverse", torch.stack([p.argsort() for p in perms]), persistent=False)
        if config.init == "random":
            with torch.no_grad():
                nn.init.normal_(self.boft_R, std=0.1)
                nn.init.normal_(self.boft_s, mean=1.0, std=0.1)

    def factor_blocks(self, dropout: bool) -> Tensor:
        """The orthogonal blocks of every factor, (m, n, b, b)."""
        m, n, b, _ = self.boft_R.shape
        raw = self.boft_R.reshape(m * n, b, b)
        blocks = cayley(0.5 * (raw - raw.transpose(1, 2))).reshape(m, n, b, b)
        return identity_dropout(blocks, self.config.dropout) if dropout else blocks

    def butterfly(self, dropout: bool = False) -> Tensor:
        """The dense butterfly matrix B (fan_in × fan_in); for inspection and tests (the update never builds it)."""
        eye = torch.eye(self.info.fan_in, dtype=self.boft_R.dtype, device=self.boft_R.device)
        return (eye + self.rotated_minus_input(eye, self.factor_blocks(dropout))).t()

    def rotated_minus_input(self, matrix: Tensor, blocks: Tensor) -> Tensor:
        """X·Bᵀ − X, one sparse factor at a time: X·M_iᵀ − X = (X[:, P_i⁻¹]·diag(R_i − I)ᵀ)[:, P_i]."""
        eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
        current, total = matrix, torch.zeros_like(matrix)
        for i in range(blocks.shape[0]):
            step = times_block_diagonal(current[:, self.inverse[i]], (blocks[i] - eye).transpose(1, 2))
            step = step[:, self.perm[i]]
            total, current = total + step, current + step
        return total

    def update(self, host: Host, dropout: bool) -> Tensor:
        matrix = to_matrix(self.info, host.weight().to(self.boft_R.dtype))
        scale = self.boft_s.unsqueeze(1)
        rotated = self.rotated_minus_input(matrix, self.factor_blocks(dropout))
        return from_matrix(self.info, scale * rotated + (scale - 1) * matrix)  # s⊙(W + WBᵀ − W) − W

    def delta_weight(self, host: Host) -> Tensor:
        return self.update(host, dropout=False)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        weight = self.update(host, dropout=self.training and self.config.dropout > 0)
        return y + host.apply(x, weight).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: BoftConfig, info: HostInfo, path: str) -> int:
        b, n = butterfly_shape(config, info, path)
        return config.n_butterfly_factor * n * b * b + info.out_features

    # ---- on disk: PEFT's names and shapes ---------------------------------------------------------------------------
    def _scale_shape(self) -> tuple[int, int]:
        out = self.info.out_features
        return (1, out) if self.info.kind in CONV_KINDS else (out, 1)

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"boft_R": self.boft_R.detach(), "boft_s": self.boft_s.detach().reshape(self._scale_shape())}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            self.boft_R.copy_(tensors["boft_R"])
            self.boft_s.copy_(tensors["boft_s"].reshape(-1))


BOFT_PEFT = mapped_peft_format(
    "BOFT",
    {"boft_block_size": "block_size", "boft_block_num": "block_num", "boft_n_butterfly_factor": "n_butterfly_factor",
     "boft_dropout": "dropout"},
    lambda config: {"fan_in_fan_out": False, "init_weights": config.init == "identity"},
    lambda raw, fields: {"init": "identity" if raw.get("init_weights", True) else "random"},
    ignored=set(),
)

PAPER = ("Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (Liu et al., 2023) "
         "https://arxiv.org/abs/2311.06243")
HOSTS = (*LINEAR_KINDS, *CONV_KINDS)  # the butterfly rotates the input side, which an embedding does not have
register_method("boft", config=BoftConfig, family="orthogonal", paper=PAPER, hosts=HOSTS, peft=BOFT_PEFT)(BoftDelta)
