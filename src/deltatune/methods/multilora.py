"""MultiLoRA: "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning", Wang et al., 2023,
https://arxiv.org/abs/2311.11501

Update rule (matrix view, W of shape out × in):  W' = W + Σ_{i=1..n} s_i·B_i·A_i — n LoRA modules side by side
("horizontal scaling"), each with its own learnable scalar s_i.
Init: the paper changes LoRA's init to lower the dependency between the two factors: A_i and B_i are both
Kaiming-uniform (a = √5, as LoRA's A) and every s_i starts at 0, so the model is unchanged at step 0 while both
factors already receive gradients.
Shapes: A_i (r, in), B_i (out, r), s (n,) (ConvNd hosts use the matrix view). Trainable parameters:
n·(r·(in + out) + 1). Forward, merge and the gathered mixed-batch kernel come from `factored.FactoredDelta`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_positive, kaiming_rows


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
        check_positive("multilora", r=self.r, n=self.n)


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
