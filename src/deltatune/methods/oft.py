"""OFT: "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", Qiu et al., 2023,
https://arxiv.org/abs/2306.07280 — with the OFTv2 conventions PEFT implements now.

Update rule (matrix view W of shape out × fan_in):  W' = W·Rᵀ,  R = diag(R_1, ..., R_r),
i.e. every input is rotated block-wise before the frozen layer (y = W·Rᵀx). Each block R_i (b × b, r·b = fan_in) is
the Cayley transform of a skew-symmetric Q_i = −Q_iᵀ whose b(b−1)/2 free entries (its strict upper triangle, row
major) are the trainable parameters:  exact  R_i = (I − Q_i)(I + Q_i)⁻¹,  or the truncated Neumann series
R_i ≈ I + 2Q_i + 2Q_i² + … + Q_i^k (`cayley_neumann`, PEFT's default; close to orthogonal, no inverse). Because R is
orthogonal, W' keeps the norms of W's rows and the angles between them (the hyperspherical energy of the neurons).
On an embedding the rotation acts on the embedding vectors instead (E' = E·R, as PEFT).
Options: `block_share` (one Q for all blocks), COFT (`coft`: each ‖Q_i‖_F is kept ≤ eps/√(stored blocks) by
projecting the parameter after every update, PEFT's constrained variant).
Init: Q = 0, so R = I and the model is unchanged ("random": Q ~ N(0, 0.1²), for tests and PEFT parity).
Shapes: skew (r, b(b−1)/2), or (1, b(b−1)/2) with block_share; saved as PEFT's `oft_R.weight` /
`oft_embedding_R.weight`. Give either r (blocks) or block_size; like PEFT, a value that does not divide the layer
is moved to the nearest divisor (ties to the smaller) with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import refuse_unknown_peft_fields

# ---- helpers shared by the orthogonal family (BOFT imports them) -----------------------------------------------------


def skew_symmetric(free: Tensor, size: int) -> Tensor:
    """(n, size(size−1)/2) strict-upper-triangle entries (row major) -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1, device=free.device)
    upper = free.new_zeros(free.shape[0], size, size)
    upper[:, rows, cols] = free
    return upper - upper.transpose(1, 2)


def cayley(skew: Tensor) -> Tensor:
    """Exact Cayley transform (I − Q)(I + Q)⁻¹ of a batch of skew-symmetric matrices: always orthogonal."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: Tensor, terms: int) -> Tensor:
    """PEFT's Cayley–Neumann approximation (I + Q)(I + Q + … + Q^m) = I + 2Q + … + 2Q^m + Q^(m+1), m = max(terms−2, 2).

    It approximates (I + Q)(I − Q)⁻¹ (the transpose of `cayley`'s convention, as in PEFT) without an inverse."""
    out = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    if terms <= 1:
        return out
    out = out + 2 * skew
    if terms == 2:
        return out
    power = skew
    for _ in range(max(terms - 2, 2) - 1):
        power = power @ skew
        out = out + 2 * power
    return out + power @ skew


def times_block_diagonal(matrix: Tensor, blocks: Tensor) -> Tensor:
    """matrix · diag(blocks_1, ..., blocks_n) for matrix (rows, n·b) and blocks (n, b, b)."""
    n, b, _ = blocks.shape
    return torch.einsum("rnk,nkc->rnc", matrix.reshape(-1, n, b), blocks).reshape(matrix.shape)


def check_exactly_one(method: str, **sizes: int) -> None:
    """Two alternative ways to give a block structure (r / block_size, ...): exactly one must be positive."""
    (a, first), (b, second) = sizes.items()
    if first < 0 or second < 0 or (first == 0) == (second == 0):
        raise DeltatuneError(f"{method}: give exactly one of {a} and {b} as a positive number and the other 0, "
                             f"got {a}={first}, {b}={second}")


def nearest_divisor(dim: int, wanted: int) -> int:
    """The divisor of `dim` closest to `wanted`, the smaller one on a tie (PEFT's rule for OFT block sizes)."""
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - wanted), d))


# ---- OFT ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class OftConfig(DeltaConfig):
    """Attributes:
    r: number of diagonal blocks per layer; 0 derives it from block_size (give exactly one of r, block_size).
    block_size: size b of each block; 0 derives it from r.
    coft: constrained OFT: keep each block's skew matrix within eps of zero (projected after each update).
    eps: COFT radius (divided by √(number of stored blocks), as PEFT).
    block_share: one skew matrix shared by all blocks of a layer.
    cayley_neumann: use the Neumann-series Cayley approximation (PEFT's default) instead of the exact inverse.
    neumann_terms: number of Neumann terms when cayley_neumann is on.
    init: "identity" (Q = 0, the model is unchanged) or "random" (Q ~ N(0, 0.1²); tests).
    """

    r: int = 0
    block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    cayley_neumann: bool = False
    neumann_terms: int = 5
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        super().validate()
        check_exactly_one(self.method, r=self.r, block_size=self.block_size)
        if self.eps <= 0:
            raise DeltatuneError(f"{self.method}: eps must be > 0, got eps={self.eps}")
        if self.neumann_terms < 1:
            raise DeltatuneError(f"{self.method}: neumann_terms must be >= 1, got {self.neumann_terms}")


def rotated_dim(info: HostInfo) -> int:
    """The dimension OFT rotates: the embedding dimension of an embedding, else the input (fan_in) side."""
    return info.out_features if info.kind == "embedding" else info.fan_in


def oft_block_size(config: OftConfig, info: HostInfo, path: str) -> int:
    """Block size b on this layer: the configured r or block_size, moved to a divisor of the layer (PEFT's rule)."""
    dim = rotated_dim(info)
    wanted = config.block_size or config.r
    fitted = nearest_divisor(dim, wanted)
    if fitted != wanted:
        what = "block_size" if config.block_size else "r"
        warnings.warn(f"{config.method}: {what}={wanted} does not divide {dim} at {path!r}; using {what}={fitted}")
    return fitted if config.block_size else dim // fitted


class OftDelta(Delta):
    """y = base(x) + (W·Rᵀ − W)·x, R block-diagonal orthogonal (E·R − E on embeddings)."""

    uses_base_weight = True

    def __init__(self, config: OftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.block_size = oft_block_size(config, info, path)
        self.n_blocks = rotated_dim(info) // self.block_size
        stored = 1 if config.block_share else self.n_blocks
        self.skew = nn.Parameter(torch.zeros(stored, self.block_size * (self.block_size - 1) // 2))
        if config.init == "random":
            with torch.no_grad():
                nn.init.normal_(self.skew, std=0.1)

    def coft_factor(self) -> Tensor:
        """COFT's shrink factor per stored Q: min(1, bound/‖Q‖_F), bound = eps/√stored (as PEFT), shape (stored, 1).

        Blocks within a hair of the bound count as inside, so a projected parameter stays exactly as it is."""
        bound = self.config.eps / math.sqrt(self.skew.shape[0])
        norms = math.sqrt(2.0) * self.skew.detach().norm(dim=1)  # ‖Q‖_F: every free entry appears twice
        return torch.where(norms > bound * (1 + 1e-5), bound / norms, torch.ones_like(norms)).unsqueeze(1)

    def rotation_blocks(self) -> Tensor:
        """The orthogonal blocks R_i, shape (n_blocks, b, b)."""
        free = self.skew * self.coft_factor() if self.config.coft else self.skew
        skew = skew_symmetric(free, self.block_size)
        blocks = cayley_neumann(skew, self.config.neumann_terms) if self.config.cayley_neumann else cayley(skew)
        return blocks.expand(self.n_blocks, -1, -1)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.config.coft and self.training:
            # Projected gradient descent (COFT, as PEFT): after each optimizer step the parameter itself is moved
            # back into the ball, so the next step starts from the projected point. Outputs are the same either way.
            # Only a parameter outside the ball is written, so a module called twice in one step keeps its graph.
            factor = self.coft_factor()
            if (factor < 1).any():
                with torch.no_grad():
                    self.skew.mul_(factor)
        return super().forward(x, y, host)

    def delta_weight(self, host: Host) -> Tensor:
        blocks = self.rotation_blocks()
        minus_eye = blocks - torch.eye(self.block_size, dtype=blocks.dtype, device=blocks.device)
        weight = host.weight().to(blocks.dtype)
        if self.info.kind == "embedding":  # native (vocab, dim): E' − E = E·(R − I)
            return times_block_diagonal(weight, minus_eye)
        return from_matrix(self.info, times_block_diagonal(to_matrix(self.info, weight), minus_eye.transpose(1, 2)))

    @classmethod
    def num_parameters(cls, config: OftConfig, info: HostInfo, path: str) -> int:
        b = oft_block_size(config, info, path)
        blocks = 1 if config.block_share else rotated_dim(info) // b
        return blocks * b * (b - 1) // 2

    # ---- on disk: PEFT's names --------------------------------------------------------------------------------------
    def _key(self) -> str:
        return "oft_embedding_R.weight" if self.info.kind == "embedding" else "oft_R.weight"

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {self._key(): self.skew.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            self.skew.copy_(tensors[self._key()])


# ---- PEFT OFTConfig <-> OftConfig ------------------------------------------------------------------------------------


def peft_fields(raw: dict, mapped: dict[str, str], ignored: set[str], kind: str) -> dict[str, Any]:
    """Our config kwargs from PEFT's method fields: an allowlist; anything else set to a non-empty value is refused."""
    refuse_unknown_peft_fields(kind, {k: v for k, v in raw.items() if v != "none"}, {*mapped, *ignored})
    return {ours: raw[theirs] for theirs, ours in mapped.items() if theirs in raw}


def mapped_peft_format(peft_type: str, mapped: dict[str, str], extra_out: Callable[[Any], dict],
                       extra_in: Callable[[dict, dict], dict], ignored: set[str]) -> PeftFormat:
    """A PEFT mapping made of renamed fields (PEFT name -> ours) plus per-method extras in each direction.

    PEFT's `bias` field is written as "none" and refused on load when set to anything else (no bias training here);
    `fan_in_fan_out` and `init_weights` only matter when PEFT creates an adapter, so they are ignored on load."""

    def to_peft(config) -> dict:
        out = {theirs: getattr(config, ours) for theirs, ours in mapped.items()}
        return {**out, "bias": "none", **extra_out(config)}

    def from_peft(raw: dict) -> dict:
        fields = peft_fields(raw, mapped, {"fan_in_fan_out", "init_weights", *ignored}, peft_type)
        return {**fields, **extra_in(raw, fields)}

    return PeftFormat(peft_type, to_peft, from_peft, lambda raw: True)


def _oft_extra_out(config: OftConfig) -> dict:
    # peft_version >= 0.18 marks the Cayley–Neumann series we compute (PEFT warns about older adapters without it).
    return {"module_dropout": 0.0, "fan_in_fan_out": False, "init_weights": config.init == "identity",
            "peft_version": "0.18.0"}


def _oft_extra_in(raw: dict, fields: dict) -> dict:
    return {"cayley_neumann": raw.get("use_cayley_neumann", True),  # PEFT's default
            "init": "identity" if raw.get("init_weights", True) else "random"}


# PEFT's OFT layers build a module_dropout layer but never apply it in forward: ignoring it reproduces PEFT exactly.
OFT_PEFT = mapped_peft_format(
    "OFT",
    {"r": "r", "oft_block_size": "block_size", "coft": "coft", "eps": "eps", "block_share": "block_share",
     "use_cayley_neumann": "cayley_neumann", "num_cayley_neumann_terms": "neumann_terms"},
    _oft_extra_out, _oft_extra_in, ignored={"module_dropout"},
)

PAPER = "Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al., 2023) https://arxiv.org/abs/2306.07280"
HOSTS = (*LINEAR_KINDS, "embedding", *CONV_KINDS)
register_method("oft", config=OftConfig, family="orthogonal", paper=PAPER, hosts=HOSTS, peft=OFT_PEFT)(OftDelta)
