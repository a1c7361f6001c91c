"""HyperFormer: "Parameter-efficient Multi-task Fine-tuning for Transformers via Shared Hypernetworks", Karimi Mahabadi
et al., 2021, https://arxiv.org/abs/2106.04489

One hypernetwork generates every adapted layer's bottleneck adapter (HyperFormer++: one network for all layers and
positions) from a task embedding z_τ and an embedding eᵢ of the adapted module (layer id and position):
    I = W₂·ReLU(W₁·[z_τ; eᵢ] + c₁) + c₂                           (the task projector, width projected_dim)
    (W_down, b_down) = reshape(H_down·I + h_down),  (W_up, b_up) = reshape(H_up·I + h_up)
and the layer's output h becomes h + σ(h·W_downᵀ + b_down)·W_upᵀ + b_up (a sequential adapter, placed after the
attention and feed-forward blocks by default). Generated matrices have the widest adapted width d; a narrower layer
uses their leading block. The paper's task-conditioned layer norms are not generated here.

Tasks: one adapter per task. The first task's adapter owns the hypernetwork; each further task's adapter names it
with `hypernetwork_from="<first task>"` and then adds only its own task embedding z_τ. Switch task with
`deltatune.use(model, "<task>")`; a batch mixing tasks goes through `deltatune.per_sample` (gathered: each task's
generated adapter is stacked and applied with bmm). Training any task trains the shared hypernetwork. A saved task
adapter holds a copy of the hypernetwork, so it loads on its own; loading it next to its `hypernetwork_from` adapter
shares (and overwrites) that adapter's hypernetwork with the saved copy.
Init: the up head (H_up, h_up) is zero, so every generated adapter starts as the identity ("identity"); the down head
~ N(0, 1/(projected_dim·d)); embeddings ~ N(0, 1). Parameters (adapter-wide): task_dim + L·layer_dim
+ (task_dim + layer_dim + 1)·P + (P + 1)·P + (P + 1)·(r·d + r) + (P + 1)·(d·r + d), L adapted modules, P =
projected_dim; a task sharing another's hypernetwork adds task_dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .bottleneck import (
    SEQUENTIAL_HOSTS,
    Affine,
    BottleneckConfig,
    BottleneckDelta,
    Placement,
    SequentialBottleneckDelta,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperformerConfig(BottleneckConfig):
    """Attributes (besides BottleneckConfig's; r / reduction_factor apply to the widest adapted width):
    task_dim: size of the task embedding z_τ.
    layer_dim: size of each adapted module's embedding eᵢ.
    projected_dim: width P of the task projector's output I.
    hypernetwork_from: an attached hyperformer adapter (another task) whose hypernetwork this one shares.
    """

    task_dim: int = 64
    layer_dim: int = 64
    projected_dim: int = 64
    hypernetwork_from: str | None = None
    placement: Placement = "both"
    init: Literal["identity", "houlsby"] = "identity"

    def validate(self) -> None:
        super().validate()
        bad = [f"{k}={getattr(self, k)}" for k in ("task_dim", "layer_dim", "projected_dim") if getattr(self, k) <= 0]
        if bad:
            raise DeltatuneError(f"hyperformer: {', '.join(bad)} must be > 0")


def widest(hosts: dict[str, HostInfo]) -> int:
    return max(BottleneckDelta.widths(info)[1] for info in hosts.values())


class HyperNetwork(nn.Module):
    """Module embeddings, the task projector and the two heads that emit a flattened adapter."""

    def __init__(self, config: HyperformerConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        self.width = widest(hosts)
        self.r = config.bottleneck_for(self.width)
        self.index = {path: i for i, path in enumerate(hosts)}
        size = config.projected_dim
        self.layer_embedding = nn.Parameter(torch.randn(len(hosts), config.layer_dim))
        self.projector = nn.Sequential(Affine(config.task_dim + config.layer_dim, size), nn.ReLU(), Affine(size, size))
        self.down_head = Affine(size, self.r * self.width + self.r)
        self.up_head = Affine(size, self.width * self.r + self.width)
        with torch.no_grad():
            nn.init.normal_(self.down_head.weight, std=1.0 / math.sqrt(size * self.width))
            nn.init.zeros_(self.down_head.bias)
            scale = 1e-2 / math.sqrt(size) if config.init == "houlsby" else 0.0
            nn.init.normal_(self.up_head.weight, std=scale) if scale else nn.init.zeros_(self.up_head.weight)
            nn.init.zeros_(self.up_head.bias)

    def generate(self, task: Tensor, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_down (r, d), b_down (r,), W_up (d, r), b_up (d,)) for one task embedding and one adapted module."""
        if path not in self.index:
            raise DeltatuneError(f"hyperformer: the shared hypernetwork has no embedding for {path!r}; tasks sharing "
                                 "a hypernetwork must adapt the same modules")
        code = self.projector(torch.cat([task, self.layer_embedding[self.index[path]]]))
        r, d = self.r, self.width
        down = self.down_head(code)
        up = self.up_head(code)
        return down[: r * d].view(r, d), down[r * d:], up[: d * r].view(d, r), up[d * r:]


class HyperformerShared(nn.Module):
    """An adapter's task embedding, and the hypernetwork (its own, or another task's)."""

    def __init__(self, config: HyperformerConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        self.task_embedding = nn.Parameter(torch.randn(config.task_dim))
        self.hypernet = HyperNetwork(config, hosts)


class HyperformerDelta(SequentialBottleneckDelta):
    """A sequential bottleneck adapter whose weights the adapter's hypernetwork generates for its task."""

    fast_parameters = ()

    def make_parameters(self, config: HyperformerConfig) -> None:
        """No per-layer parameters: everything lives in the adapter-wide module."""

    def setup(self, host: Host) -> None:
        source = self.config.hypernetwork_from
        if source is None:
            return
        partner = host.slot._modules.get(source)
        if not isinstance(partner, HyperformerDelta):
            raise DeltatuneError(f"hyperformer: hypernetwork_from={source!r} is not a hyperformer adapter attached at "
                                 f"{self.path!r}; attach (or load) that task's adapter first, on the same modules")
        hypernet = partner.shared.hypernet
        mine = self.shared.hypernet
        if (hypernet.r, hypernet.width, hypernet.layer_embedding.shape) != (mine.r, mine.width,
                                                                           mine.layer_embedding.shape):
            raise DeltatuneError(f"hyperformer: adapter {source!r} has a hypernetwork of another shape; give both "
                                 "tasks the same r, widths and targets")
        self.shared.hypernet = hypernet  # shared: registered under both adapters, trained once

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        down, down_bias, up, up_bias = self.shared.hypernet.generate(self.shared.task_embedding, self.path)
        return down[:, : self.d_in], down_bias, up[: self.d_out], up_bias[: self.d_out]

    @classmethod
    def make_shared(cls, config: HyperformerConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        return HyperformerShared(config, hosts)

    @classmethod
    def num_parameters(cls, config: HyperformerConfig, info: HostInfo, path: str) -> int:
        return 0

    @classmethod
    def num_shared_parameters(cls, config: HyperformerConfig, hosts: dict[str, HostInfo]) -> int:
        if config.hypernetwork_from is not None:
            return config.task_dim
        d, size = widest(hosts), config.projected_dim
        r = config.bottleneck_for(d)
        projector = (config.task_dim + config.layer_dim + 1) * size + (size + 1) * size
        heads = (size + 1) * (r * d + r) + (size + 1) * (d * r + d)
        return config.task_dim + len(hosts) * config.layer_dim + projector + heads


PAPER = ("Parameter-efficient Multi-task Fine-tuning for Transformers via Shared Hypernetworks (Karimi Mahabadi et "
         "al., 2021) https://arxiv.org/abs/2106.04489")
register_method("hyperformer", config=HyperformerConfig, family="hypernetwork", paper=PAPER,
                hosts=SEQUENTIAL_HOSTS)(HyperformerDelta)
