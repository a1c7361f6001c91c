"""AdapterFusion: "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", Pfeiffer et al., 2021,
https://arxiv.org/abs/2005.00247

Combines the outputs oᵢ of several trained adapters on a layer with attention: with the layer output y as query,
    wᵢ = softmax_i((Q·y) · (K·oᵢ) / τ),   fused = Σᵢ wᵢ · (V·oᵢ).
Used through the `Fuse` composition block: `deltatune.use(model, deltatune.Fuse("a", "b", fusion="f"))`, after
attaching a "fusion" adapter named "f" on the same layers. Trained in a second stage with the task adapters frozen;
V starts at the identity and `regularization_loss()` gives the paper's value-identity regulariser λ·‖V − I‖².
Init: Q = K = 0 (uniform weights: the fusion starts as the plain average of the adapters), V = I.
Parameters: Q, K, V, each d × d with d the layer's output width. Alone (not inside a Fuse) it applies V to the
layer's output (the identity at init).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo
from ..core.registry import register_method
from ..core.slot import Host


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionConfig(DeltaConfig):
    """Attributes:
    temperature: softmax temperature τ over the adapters.
    value_identity_weight: λ of the value-identity regulariser.
    """

    temperature: float = 1.0
    value_identity_weight: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or self.value_identity_weight < 0:
            raise DeltatuneError(f"fusion: temperature must be > 0 and value_identity_weight >= 0, got "
                                 f"{self.temperature}, {self.value_identity_weight}")


class FusionDelta(Delta):
    """Attention over the children's outputs of a `Fuse` block; V·y on its own."""

    def __init__(self, config: FusionConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        d = info.out_features
        self.query = nn.Parameter(torch.zeros(d, d))
        self.key = nn.Parameter(torch.zeros(d, d))
        self.value = nn.Parameter(torch.eye(d))

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return self.fuse(y, [y])  # alone it fuses the layer's own output: V·y, the identity at init

    def fuse(self, y: Tensor, outputs: list[Tensor]) -> Tensor:
        stack = torch.stack(outputs, dim=-2).to(self.value.dtype)  # (..., n, d)
        query = y.to(self.value.dtype) @ self.query.t()  # (..., d)
        keys = stack @ self.key.t()  # (..., n, d)
        weights = torch.softmax((keys * query.unsqueeze(-2)).sum(-1) / self.config.temperature, dim=-1)
        return (weights.unsqueeze(-1) * (stack @ self.value.t())).sum(-2).to(y.dtype)

    def regularization_loss(self) -> Tensor:
        eye = torch.eye(self.value.shape[0], dtype=self.value.dtype, device=self.value.device)
        return self.config.value_identity_weight * (self.value - eye).pow(2).sum()

    @classmethod
    def num_parameters(cls, config: FusionConfig, info: HostInfo, path: str) -> int:
        return 3 * info.out_features**2


PAPER = ("AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2021) "
         "https://arxiv.org/abs/2005.00247")
register_method("fusion", config=FusionConfig, family="composition", paper=PAPER, hosts=LINEAR_KINDS)(FusionDelta)
