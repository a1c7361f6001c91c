"""QR-LoRA: "QR-LoRA: Efficient and Disentangled Fine-tuning via QR Decomposition for Customized Generation",
Yang et al., 2025, https://arxiv.org/abs/2507.04599

Setup (matrix view W of shape out × fan_in): the rank-r principal part of W, W_r = U_r·Σ_r·V_rᵀ (truncated SVD),
is QR-decomposed, W_r = Q·R, and the first r columns of the orthonormal Q (out × r) are kept frozen.
Update rule:  W' = W_res + s·Q·(R + ΔR) = W + s·Q·ΔR,  s = alpha / r (alpha / √r with use_rslora),
with only ΔR (r × fan_in) trained: half of LoRA's parameters when the layer is square, and every update lies in the
span of W's top-r left singular vectors. Updates of different tasks live in ΔR alone, so they merge by addition.
Init: ΔR = 0, so the model is unchanged ("random": ΔR ~ N(0, 0.01²), the paper code's non-zero option).
Shapes: qr_delta_R (r, fan_in) trainable (a convolution with the host's kernel on ConvNd), qr_Q (out, r) frozen and
saved with the adapter (recomputing it needs the exact base weights). It is LoRA with B = Q frozen and A = ΔR, so
it shares LoRA's fused forward, convolution and embedding support, options and gathered mixed-batch kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.hosts import HostInfo, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .lora import LoraConfig, LoraDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class QrLoraConfig(LoraConfig):
    """LoRA's fields (r, alpha, dropout, use_rslora, bias, lora_bias, rank_pattern, alpha_pattern), except:

    Attributes:
        init: "zero" (ΔR = 0: the model is unchanged) or "random" (ΔR ~ N(0, 0.01²)).
    """

    init: Literal["zero", "random"] = "zero"


# LoRA's tensor names -> ours (the math is LoRA's with A = ΔR and B = Q, the file says what they are).
_RENAME = {"lora_A.weight": "qr_delta_R", "lora_embedding_A": "qr_delta_R",
           "lora_B.weight": "qr_Q", "lora_embedding_B": "qr_Q"}


class QrLoraDelta(LoraDelta):
    """y = base(x) + s·Q(ΔR(dropout(x))) (+ Δb), Q frozen."""

    frozen_parameters = ("lora_B",)
    fast_parameters = ()  # LoRA+'s "B side" is frozen here

    def __init__(self, config: QrLoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(self.r, min(info.out_features, info.fan_in))

    def reset_parameters(self, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_B)  # Q is computed from the base weight in setup
            if init == "random":
                nn.init.normal_(self.lora_A, std=0.01)
            else:
                nn.init.zeros_(self.lora_A)

    def setup(self, host: Host) -> None:
        self.lora_B.copy_(principal_basis(to_matrix(self.info, host.weight()), self.r).reshape(self.lora_B.shape))

    @classmethod
    def num_parameters(cls, config: QrLoraConfig, info: HostInfo, path: str) -> int:
        return super().num_parameters(config, info, path) - config.rank_for(path) * info.out_features

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {_RENAME.get(k, k): v for k, v in super().state_tensors(host).items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        back = {"qr_delta_R": "lora_A.weight", "qr_Q": "lora_B.weight"}
        super().load_state_tensors({back.get(k, k): v for k, v in tensors.items()}, host)


def principal_basis(matrix: Tensor, r: int) -> Tensor:
    """Q[:, :r] of the QR decomposition of W's rank-r truncated SVD (computed in float32)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    principal = (u[:, :r] * s[:r]) @ vh[:r]
    return torch.linalg.qr(principal).Q[:, :r]


PAPER = ("QR-LoRA: Efficient and Disentangled Fine-tuning via QR Decomposition for Customized Generation "
         "(Yang et al., 2025) https://arxiv.org/abs/2507.04599")
register_method("qr_lora", config=QrLoraConfig, family="low-rank", paper=PAPER)(QrLoraDelta)
