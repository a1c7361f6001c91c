"""BoRA: "BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation", Wang, Fan, Bao, Jiang and Song, 2024,
https://arxiv.org/abs/2412.06441

DoRA splits each output channel of W into a trained magnitude and a direction; BoRA does it along both dimensions,
with one magnitude vector per output channel (m_out) and one per input column (m_in). In the matrix view
(W0 of shape out × in, V = W0 + s·B·A the LoRA-updated direction, norms taken along the named dimension):
    W₁ = diag(m_out / ‖V‖_row) · V                       (DoRA's step: row i of W₁ has norm m_out[i])
    W' = W₁ · diag(m_in / ‖W₁‖_col)                      (column j of W' has norm m_in[j])
As in DoRA (§4.3 of its paper) both norms are treated as constants in the backward pass.
Init: LoRA's (B = 0), m_out = ‖W0‖_row and m_in = ‖W0‖_col, so W' = W0 at step 0.
Parameters: LoRA's A (r, in), B (out, r), plus m_out (out,) and m_in (in,); saved under these attribute names
(lora_A, lora_B, magnitude, magnitude_in). in is fan_in: the vocabulary of an Embedding, in_channels·kernel of a
convolution. Mixed batches run each adapter on its own rows (ΔW is dense).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import add_dense
from .dora import DoraConfig, DoraDelta
from .lora import lora_matrix


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoraConfig(DoraConfig):
    """DoRA's fields (LoRA's without `lora_bias`); BoRA adds no hyperparameter."""

    def validate(self) -> None:
        if self.lora_bias:
            raise DeltatuneError("bora: lora_bias=True is not supported (as in DoRA); use bias='lora_only' instead")
        super().validate()


class BoraDelta(DoraDelta):
    """y = base(x) + (W' − W0)·dropout(x) (+ Δb), W' the bi-dimensionally normalised W0 + s·BA."""

    def __init__(self, config: BoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.magnitude_in = nn.Parameter(torch.ones(info.fan_in))

    def setup(self, host: Host) -> None:
        super().setup(host)
        self.magnitude_in.copy_(self.row_normalised(host, detach=True).norm(dim=0))

    def row_normalised(self, host: Host, *, detach: bool) -> Tensor:
        """W₁ = diag(m_out / ‖V‖_row)·V, V = W0 + s·BA (matrix view)."""
        direction = to_matrix(self.info, host.weight()).to(self.lora_A.dtype)
        direction = direction + lora_matrix(self.lora_A, self.lora_B, self.scaling)
        norm = direction.norm(dim=1)
        return (self.magnitude / (norm.detach() if detach else norm)).unsqueeze(1) * direction

    def adapted_weight(self, host: Host, *, detach: bool) -> Tensor:
        """W' (matrix view); `detach` treats both norms as constants, as the forward pass does."""
        rows = self.row_normalised(host, detach=detach)
        norm = rows.norm(dim=0)
        return rows * (self.magnitude_in / (norm.detach() if detach else norm)).unsqueeze(0)

    def delta_weight(self, host: Host) -> Tensor:
        base = to_matrix(self.info, host.weight()).to(self.lora_A.dtype)
        return from_matrix(self.info, self.adapted_weight(host, detach=False) - base)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        base = to_matrix(self.info, host.weight()).to(self.lora_A.dtype)
        delta = from_matrix(self.info, self.adapted_weight(host, detach=True) - base)
        return add_dense(self.dropped(x), y, host, delta, self.delta_bias(host))

    @classmethod
    def num_parameters(cls, config: BoraConfig, info: HostInfo, path: str) -> int:
        return super().num_parameters(config, info, path) + info.fan_in

    # ΔW is dense: each adapter runs on its own rows (DoRA's gathered kernel does not apply).
    per_row = Delta.__dict__["per_row"]

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return Delta.state_tensors(self, host)

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        Delta.load_state_tensors(self, tensors, host)


PAPER = ("BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation (Wang et al., 2024) "
         "https://arxiv.org/abs/2412.06441")
register_method("bora", config=BoraConfig, family="low-rank", paper=PAPER)(BoraDelta)
