"""LoRMA: "LoRMA: Low-Rank Multiplicative Adaptation for LLMs", Bihany, Patel and Modi, 2025,
https://arxiv.org/abs/2506.07621

Update rule (matrix view, W0 of shape out × in; B (out, r), A (r, out), s = alpha / r): the weight is
*multiplied* by a learned out × out transform instead of added to. A bare low-rank transform B·A would cap W' at
rank r, so the paper inflates its rank in one of two ways:
    LoRMA₊ (variant "plus"):  W' = (I + s·B·A)·W0          (rank ≥ out − r; ΔW = s·B·A·W0)
    LoRMA_π (variant "pi"):   W' = s·I_π(B·A)·W0           (I_π rotates row i of B·A right by i places)
LoRMA₊ is computed with the paper's re-ordering, y += s·B(A(W0·x)), reusing the base layer's output W0·x;
LoRMA_π needs the full out × out transform. ΔW depends on W0, so merging keeps what it added
(`uses_base_weight`).
Init (the paper's identity inits): plus: B = 0, A Kaiming-uniform. pi: A = 0 except A[0, 0] = 1/√s, B
Kaiming-uniform with its first column 1/√s, so s·B·A has every row e_0 and I_π(s·B·A) = I. Either way W' = W0 at
step 0. Shapes: lorma_A (r, out), lorma_B (out, r) — out_features is the output channels of a convolution and the
embedding dim of an Embedding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, add_dense, check_positive, kaiming_


@dataclasses.dataclass(frozen=True, kw_only=True)
class LormaConfig(DeltaConfig):
    """Attributes:
    r: rank of the learned out × out transform B·A.
    alpha: scaling numerator: s = alpha / r.
    variant: rank inflation: "plus" (W' = (I + s·BA)·W0) or "pi" (W' = s·I_π(BA)·W0, cyclic row shifts).
    """

    r: int = 8
    alpha: float = 8.0
    variant: Literal["plus", "pi"] = "plus"

    def validate(self) -> None:
        super().validate()
        check_positive("lorma", r=self.r)
        if self.alpha == 0:
            raise DeltatuneError("lorma: alpha must be non-zero (s = alpha / r scales the transform); set alpha = r")


def cyclic_row_shift(matrix: Tensor) -> Tensor:
    """I_π: row i rotated right by i places, out[i, j] = M[i, (j - i) mod n] (all rows e_0 become I)."""
    n_rows, n_cols = matrix.shape
    rows = torch.arange(n_rows, device=matrix.device).unsqueeze(1)
    cols = torch.arange(n_cols, device=matrix.device).unsqueeze(0)
    return torch.gather(matrix, 1, (cols - rows) % n_cols)


class LormaDelta(FactoredDelta):
    """plus: y = base(x) + s·B(A(W0·x));  pi: y = base(x) + (s·I_π(BA) − I)·W0·x."""

    uses_base_weight = True
    fast_parameters = ("lorma_B",)

    def __init__(self, config: LormaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r)
        self.scaling = config.alpha / config.r
        out = info.out_features
        self.lorma_A = nn.Parameter(kaiming_(torch.empty(config.r, out)))
        self.lorma_B = nn.Parameter(torch.zeros(out, config.r))
        if config.variant == "pi":
            root = 1 / math.sqrt(abs(self.scaling))
            with torch.no_grad():
                self.lorma_A.zero_()[0, 0] = root * math.copysign(1.0, self.scaling)
                kaiming_(self.lorma_B)[:, 0] = root

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.config.variant == "pi":
            return add_dense(x, y, host, self.delta_weight(host))
        # s·B(A(W0·x)) from the layer's own output W0·x (without bias); not in place, as it reads y.
        z = host.base_output(x).movedim(self.info.channel_dim, -1).to(self.lorma_A.dtype)
        update = F.linear(F.linear(z, self.lorma_A), self.lorma_B * self.scaling)
        return y + update.movedim(-1, self.info.channel_dim).to(y.dtype)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """LoRMA₊'s ΔW = s·B·(A·W0): down = A·W0 (r, fan_in), up = s·B (for the gathered mixed-batch kernel)."""
        return self.lorma_A @ to_matrix(self.info, host.weight()).to(self.lorma_A.dtype), self.lorma_B * self.scaling

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if any(d.config.variant == "pi" for d in deltas):  # the full out × out transform: each adapter on its rows
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        return super().per_row(deltas, slots, x, y, host, cache)

    def transform_minus_identity(self) -> Tensor:
        """W'·W0⁻¹ − I, the out × out matrix that multiplies W0 to give ΔW."""
        product = self.lorma_B @ self.lorma_A * self.scaling
        if self.config.variant == "plus":
            return product
        return cyclic_row_shift(product) - torch.eye(len(product), dtype=product.dtype, device=product.device)

    def delta_weight(self, host: Host) -> Tensor:
        base = to_matrix(self.info, host.weight()).to(self.lorma_A.dtype)
        return from_matrix(self.info, self.transform_minus_identity() @ base)

    @classmethod
    def num_parameters(cls, config: LormaConfig, info: HostInfo, path: str) -> int:
        return 2 * config.r * info.out_features


PAPER = "LoRMA: Low-Rank Multiplicative Adaptation for LLMs (Bihany et al., 2025) https://arxiv.org/abs/2506.07621"
register_method("lorma", config=LormaConfig, family="low-rank", paper=PAPER)(LormaDelta)
