"""MSPLoRA: "MSPLoRA: A Multi-Scale Pyramid Low-Rank Adaptation for Efficient Model Fine-Tuning", Zhao et al., 2025,
https://arxiv.org/abs/2503.21838

Three LoRAs at three scales are summed on every adapted layer l (matrix view, W of shape out × in):
    ΔW_l = s_g·B_g·A_g  +  s_m·B_{m(l)}·A_{m(l)}  +  s_l·B_l·A_l,   s_x = alpha / r_x,
- a Global Shared LoRA (rank r_global) shared by every layer of the same kind,
- a Mid-Level Shared LoRA (rank r_mid) shared by the layers of one group of `mid_group_size` consecutive layers,
- a Layer-Specific LoRA (rank r_layer) of its own,
with ranks decaying from global to layer ("pyramid"; defaults 8 / 4 / 2). "Same kind" = same module name and shape;
the layer index is the number after the layer container in the module path (`model.layers.3...` -> 3; modules
outside numbered layers form one group).
Init: every A Kaiming-uniform, every B = 0, so the model is unchanged at step 0.
Trainable parameters: r_layer·(in + out) per layer (`num_parameters`), plus (r_global + groups·r_mid)·(in + out)
per kind of layer in the adapter-wide shared module (`num_shared_parameters`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from ..core.targeting import layer_index
from .denselora import LoraPair, sharing_key, unique_shapes
from .factored import FactoredDelta, check_positive, kaiming_rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class MsploraConfig(DeltaConfig):
    """Attributes:
    r_global: rank of the Global Shared LoRA.
    r_mid: rank of each Mid-Level Shared LoRA.
    r_layer: rank of each Layer-Specific LoRA.
    mid_group_size: number of consecutive layers that share one Mid-Level LoRA.
    alpha: scaling numerator; each component is scaled by alpha / its own rank.
    """

    r_global: int = 8
    r_mid: int = 4
    r_layer: int = 2
    mid_group_size: int = 4
    alpha: float = 16.0

    def validate(self) -> None:
        super().validate()
        check_positive("msplora", r_global=self.r_global, r_mid=self.r_mid, r_layer=self.r_layer,
                         mid_group_size=self.mid_group_size)

    def mid_group(self, path: str) -> int:
        """Index of the Mid-Level group of the module at `path`."""
        layer = layer_index(path, self.layers_pattern)
        return 0 if layer is None else layer // self.mid_group_size


def mid_groups(config: MsploraConfig, hosts: dict[str, HostInfo]) -> dict[str, set[int]]:
    """Sharing key -> the Mid-Level groups its layers fall into."""
    groups: dict[str, set[int]] = {}
    for path, info in hosts.items():
        groups.setdefault(sharing_key(path, info), set()).add(config.mid_group(path))
    return groups


class MsploraDelta(FactoredDelta):
    """ΔW = [s_g·B_g, s_m·B_m, s_l·B_l]·[A_g; A_m; A_l]; the shared pairs come from the adapter-wide module."""

    fast_parameters = ("lora_B",)

    def __init__(self, config: MsploraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r_layer)
        self.key = sharing_key(path, info)
        self.mid = f"mid{config.mid_group(path)}"
        self.lora_A = nn.Parameter(kaiming_rows((config.r_layer, info.fan_in)))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, config.r_layer))

    @classmethod
    def make_shared(cls, config: MsploraConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        shared = nn.ModuleDict()
        groups = mid_groups(config, hosts)
        for key, info in unique_shapes(hosts).items():
            levels = nn.ModuleDict({"global": LoraPair(config.r_global, info.fan_in, info.out_features)})
            for group in sorted(groups[key]):
                levels[f"mid{group}"] = LoraPair(config.r_mid, info.fan_in, info.out_features)
            shared[key] = levels
        return shared

    @classmethod
    def num_shared_parameters(cls, config: MsploraConfig, hosts: dict[str, HostInfo]) -> int:
        """Global pair per kind of layer plus one Mid-Level pair per (kind, group)."""
        groups = mid_groups(config, hosts)
        return sum((config.r_global + len(groups[key]) * config.r_mid) * (info.fan_in + info.out_features)
                   for key, info in unique_shapes(hosts).items())

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        levels, c = self.shared[self.key], self.config
        parts = [(levels["global"].lora_A, levels["global"].lora_B, c.r_global),
                 (levels[self.mid].lora_A, levels[self.mid].lora_B, c.r_mid),
                 (self.lora_A, self.lora_B, c.r_layer)]
        down = torch.cat([a for a, _, _ in parts])
        up = torch.cat([b * (c.alpha / r) for _, b, r in parts], dim=1)
        return down, up

    @classmethod
    def num_parameters(cls, config: MsploraConfig, info: HostInfo, path: str) -> int:
        return config.r_layer * (info.fan_in + info.out_features)


PAPER = ("MSPLoRA: A Multi-Scale Pyramid Low-Rank Adaptation for Efficient Model Fine-Tuning (Zhao et al., 2025) "
         "https://arxiv.org/abs/2503.21838")
register_method("msplora", config=MsploraConfig, family="low-rank", paper=PAPER)(MsploraDelta)
