"""HRA: "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation",
Yuan et al., 2024, https://arxiv.org/abs/2405.17484

Update rule (matrix view W of shape out × fan_in):  W' = W·H_1·H_2 ⋯ H_r,  H_i = I − 2·u_i·u_iᵀ / ‖u_i‖²,
a chain of r Householder reflections of the input space (orthogonal, so W' keeps the norms of W's rows and the angles
between them). W' − W = W·(H_1⋯H_r − I) has rank ≤ r: HRA is also an adaptive low-rank update.
With `apply_gs` the u_i are first orthonormalised (Gram–Schmidt), and the chain becomes I − 2·U·Uᵀ.
Regulariser (paper, optional): λ·‖I − ÛᵀÛ‖_F² with Û the normalised u_i — `orthogonality_penalty(model)` returns
the sum over an adapter's layers; add λ times it to the loss.
Init: "symmetric" (paper / PEFT default): u_(2i−1) = u_(2i) (Kaiming-uniform), so the reflections cancel in pairs and
the model is unchanged (needs an even r); "random": all u_i Kaiming-uniform (not the identity).
Shapes: hra_u (fan_in, r), saved under PEFT's name `hra_u`.
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
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .oft import mapped_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class HraConfig(DeltaConfig):
    """Attributes:
    r: number of Householder reflections per layer.
    apply_gs: orthonormalise the reflection vectors (Gram–Schmidt) before use.
    init: "symmetric" (paired vectors: identity at init; even r) or "random".
    """

    r: int = 8
    apply_gs: bool = False
    init: Literal["symmetric", "random"] = "symmetric"

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise DeltatuneError(f"{self.method}: r must be > 0, got r={self.r}")
        if self.init == "symmetric" and self.r % 2:
            raise DeltatuneError(f"{self.method}: init='symmetric' pairs the reflections and needs an even r, "
                                 f"got r={self.r}; use an even r or init='random'")
        if self.init == "symmetric" and self.apply_gs:
            raise DeltatuneError(f"{self.method}: apply_gs=True cannot start from init='symmetric' (paired vectors "
                                 "have no Gram–Schmidt basis); use init='random'")


class HraDelta(Delta):
    """y = base(x) + W·(H_1⋯H_r − I)·x."""

    uses_base_weight = True

    def __init__(self, config: HraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        if config.apply_gs:
            self.check_rank(self.r, info.fan_in)  # at most fan_in orthonormal vectors
        self.hra_u = nn.Parameter(torch.empty(info.fan_in, self.r))
        with torch.no_grad():
            if config.init == "symmetric":
                half = torch.empty(info.fan_in, self.r // 2)
                nn.init.kaiming_uniform_(half, a=math.sqrt(5))
                self.hra_u.copy_(half.repeat_interleave(2, dim=1))
            else:
                nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def units(self) -> Tensor:
        """The normalised reflection vectors û_i as columns (fan_in, r)."""
        return self.hra_u / self.hra_u.norm(dim=0)

    def reflected_minus_input(self, matrix: Tensor) -> Tensor:
        """X·(H_1⋯H_r − I) for X (rows, fan_in), one rank-1 reflection at a time (never a fan_in² matrix)."""
        if self.config.apply_gs:
            basis = torch.linalg.qr(self.hra_u).Q  # the Gram–Schmidt basis up to signs; U·Uᵀ does not see signs
            return -2 * (matrix @ basis) @ basis.t()
        current = matrix
        for u in self.units().unbind(1):
            current = current - 2 * torch.outer(current @ u, u)
        return current - matrix

    def reflection(self) -> Tensor:
        """H_1⋯H_r as a dense fan_in × fan_in matrix; for inspection and tests."""
        eye = torch.eye(self.info.fan_in, dtype=self.hra_u.dtype, device=self.hra_u.device)
        return eye + self.reflected_minus_input(eye)

    def delta_weight(self, host: Host) -> Tensor:
        matrix = to_matrix(self.info, host.weight().to(self.hra_u.dtype))
        return from_matrix(self.info, self.reflected_minus_input(matrix))

    def orthogonality_penalty(self) -> Tensor:
        """‖I − ÛᵀÛ‖_F² for this layer's normalised reflection vectors."""
        units = self.units()
        eye = torch.eye(self.r, dtype=units.dtype, device=units.device)
        return (units.t() @ units - eye).pow(2).sum()

    @classmethod
    def num_parameters(cls, config: HraConfig, info: HostInfo, path: str) -> int:
        return info.fan_in * config.r

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"hra_u": self.hra_u.detach()}


def orthogonality_penalty(model: nn.Module, adapter: str = "default") -> Tensor:
    """HRA's regulariser Σ_layers ‖I − ÛᵀÛ‖_F² for one adapter (multiply by the paper's λ and add to the loss)."""
    terms = [slot[adapter].orthogonality_penalty() for _, _, slot in slots_of(model)
             if adapter in slot and isinstance(slot[adapter], HraDelta)]
    if not terms:
        raise DeltatuneError(f"orthogonality_penalty: the model has no HRA adapter named {adapter!r}")
    return torch.stack(terms).sum()


def _hra_init(raw: dict, fields: dict) -> dict:
    # PEFT's default init is symmetric only for even r without Gram–Schmidt (else Kaiming); loaded weights replace it.
    symmetric = raw.get("init_weights", True) and fields.get("r", 8) % 2 == 0 and not fields.get("apply_gs", False)
    return {"init": "symmetric" if symmetric else "random"}


HRA_PEFT = mapped_peft_format("HRA", {"r": "r", "apply_GS": "apply_gs"},
                              lambda config: {"init_weights": config.init == "symmetric"}, _hra_init, ignored=set())


PAPER = ("Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation "
         "(Yuan et al., 2024) https://arxiv.org/abs/2405.17484")
register_method("hra", config=HraConfig, family="orthogonal", paper=PAPER, hosts=(*LINEAR_KINDS, *CONV_KINDS),
                peft=HRA_PEFT)(HraDelta)
