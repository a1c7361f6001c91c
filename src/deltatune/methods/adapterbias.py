"""AdapterBias: "AdapterBias: Parameter-efficient Token-dependent Representation Shift for Adapters in NLP Tasks",
Fu et al., 2022, https://arxiv.org/abs/2205.00305

A token-dependent shift of the feed-forward block's output: with x the input of the block's second linear layer
(the intermediate activations) and y its output,
    y' = y + α(x)·v,   α(x) = x·w_α + b_α (a Linear(d_in, 1), one scalar per token),   v ∈ R^d_out.
Both are linear in x, so the update is the rank-1 weight ΔW = v·w_αᵀ plus the bias Δb = b_α·v: AdapterBias merges
into the layer and mixed batches use the shared gathered low-rank kernel. Init (the authors' code): v = 0 (the model
is unchanged at step 0), (w_α, b_α) as nn.Linear. With `share_alpha` one α layer serves every adapted layer (the
paper's shared-α variant; all adapted layers must then have the same input width).
Placement (`targets=None`): the feed-forward block's output projection (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`,
BERT `output.dense`). Parameters: d_in + 1 + d_out per layer (d_out per layer + d_in + 1 once when shared).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .bottleneck import Affine, sublayer_outputs
from .factored import FactoredDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterBiasConfig(DeltaConfig):
    """Attributes:
    share_alpha: one α layer (w_α, b_α) for every adapted layer instead of one per layer.
    """

    share_alpha: bool = False

    def default_targets(self, model):
        return sublayer_outputs(model, "ffn")


def alpha_layer(width: int) -> Affine:
    """The α layer: Linear(width, 1) with nn.Linear's init."""
    return Affine(width, 1)


class AdapterBiasDelta(FactoredDelta):
    """y + (x·w_α + b_α)·v as a rank-1 factored update with a bias."""

    fast_parameters = ("vector",)

    def __init__(self, config: AdapterBiasConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.vector = nn.Parameter(torch.zeros(info.out_features))
        self.alpha = None if config.share_alpha else alpha_layer(info.fan_in)

    def alpha_weights(self) -> tuple[Tensor, Tensor]:
        layer = self.shared.alpha if self.alpha is None else self.alpha
        if layer.weight.shape[1] != self.info.fan_in:
            raise DeltatuneError(f"adapterbias: the shared α layer reads width {layer.weight.shape[1]} but "
                                 f"{self.path!r} has {self.info.fan_in}; set share_alpha=False")
        return layer.weight, layer.bias

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        weight, _ = self.alpha_weights()
        return weight, self.vector.unsqueeze(1)

    def delta_bias(self, host: Host) -> Tensor:
        _, bias = self.alpha_weights()
        return bias * self.vector

    @classmethod
    def make_shared(cls, config: AdapterBiasConfig, hosts: dict[str, HostInfo]) -> nn.Module | None:
        if not config.share_alpha:
            return None
        widths = {info.fan_in for info in hosts.values()}
        if len(widths) > 1:
            raise DeltatuneError(f"adapterbias: share_alpha needs one input width but the targets have "
                                 f"{sorted(widths)}; target layers of one width or set share_alpha=False")
        shared = nn.Module()
        shared.alpha = alpha_layer(widths.pop())
        return shared

    @classmethod
    def num_parameters(cls, config: AdapterBiasConfig, info: HostInfo, path: str) -> int:
        return info.out_features + (0 if config.share_alpha else info.fan_in + 1)

    @classmethod
    def num_shared_parameters(cls, config: AdapterBiasConfig, hosts: dict[str, HostInfo]) -> int:
        return next(iter(hosts.values())).fan_in + 1 if config.share_alpha else 0


PAPER = ("AdapterBias: Parameter-efficient Token-dependent Representation Shift for Adapters in NLP Tasks "
         "(Fu et al., 2022) https://arxiv.org/abs/2205.00305")
register_method("adapterbias", config=AdapterBiasConfig, family="bottleneck", paper=PAPER,
                hosts=("linear", "conv1d_hf"))(AdapterBiasDelta)
