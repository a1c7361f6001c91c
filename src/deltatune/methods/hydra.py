"""Hydra: "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning", Kim et al., 2023,
https://arxiv.org/abs/2309.06922

Two low-rank branches on one layer h = W₀x + b₀:
- a parallel branch on the layer's input (learns new features):      s·B_p·A_p·x,
- a sequential branch on the layer's pre-trained output (a linear combination of pre-trained features):
  s·B_s·A_s·(W₀x + b₀).
Both are linear, so the layer merges (as in the authors' reparameterisation):
    ΔW = s·(B_p·A_p + B_s·A_s·W₀),   Δb = s·B_s·A_s·b₀.
Init: A_p, A_s Kaiming-uniform, B_p = B_s = 0, so the model is unchanged at step 0.
ΔW depends on W₀ (`uses_base_weight`). Shapes (matrix view): A_p (r, in), B_p (out, r), A_s (r, out), B_s (out, r);
trainable parameters r·(in + 3·out). Hosts: Linear, transformers Conv1D and Embedding (the sequential branch acts on
the last dimension of the output).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hosts import HostInfo, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive, kaiming_rows, low_rank_output


@dataclasses.dataclass(frozen=True, kw_only=True)
class HydraConfig(DeltaConfig):
    """Attributes:
    r: rank of each branch.
    scale: s, the scale of both branches (the authors' `scale`).
    """

    r: int = 8
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_positive("hydra", r=self.r)


class HydraDelta(FactoredDelta):
    """y + s·B_p·A_p·x + s·B_s·A_s·(W₀x + b₀); as factors: down = [A_p; A_s·W₀], up = s·[B_p, B_s]."""

    uses_base_weight = True
    fast_parameters = ("parallel_B", "sequential_B")

    def __init__(self, config: HydraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        r, out = config.r, info.out_features
        self.check_rank(r)
        self.parallel_A = nn.Parameter(kaiming_rows((r, info.fan_in)))
        self.parallel_B = nn.Parameter(torch.zeros(out, r))
        self.sequential_A = nn.Parameter(kaiming_rows((r, out)))
        self.sequential_B = nn.Parameter(torch.zeros(out, r))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        weight = to_matrix(self.info, host.weight()).to(self.parallel_A.dtype)
        down = torch.cat([self.parallel_A, self.sequential_A @ weight])  # (2r, in)
        up = torch.cat([self.parallel_B, self.sequential_B], dim=1) * self.config.scale  # (out, 2r)
        return down, up

    def delta_bias(self, host: Host) -> Tensor | None:
        bias = host.bias()
        if bias is None:
            return None
        mixed = self.sequential_A @ bias.to(self.sequential_A.dtype)  # (r,)
        return (self.sequential_B @ mixed) * self.config.scale

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        # The sequential branch reads the pre-trained output W₀x + b₀ instead of forming A_s·W₀.
        s = self.config.scale
        parallel = low_rank_output(x, host, self.parallel_A, self.parallel_B * s)
        pretrained = host.base_output(x).to(self.sequential_A.dtype)
        bias = host.bias()
        if bias is not None:
            pretrained = pretrained + bias.to(pretrained.dtype)
        sequential = (pretrained @ self.sequential_A.t()) @ (self.sequential_B * s).t()
        return y + (parallel + sequential).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: HydraConfig, info: HostInfo, path: str) -> int:
        return config.r * (info.fan_in + 3 * info.out_features)


PAPER = ("Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (Kim et al., 2023) "
         "https://arxiv.org/abs/2309.06922")
register_method("hydra", config=HydraConfig, family="low-rank", paper=PAPER,
                hosts=("linear", "conv1d_hf", "embedding"))(HydraDelta)
