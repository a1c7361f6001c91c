"""PRILoRA: "Pruned and Rank-Increasing Low-Rank Adaptation", Benedek & Wolf, 2024, https://arxiv.org/abs/2401.11316

Update rule: LoRA's, W' = W + (alpha / r_ℓ)·B·A, with a rank that grows linearly with depth:
r_ℓ = r_min + round((r − r_min)·ℓ / (num_layers − 1)) for layer ℓ (0-based; modules outside a numbered layer, or
any module when num_layers is not set, get r). Every `prune_every` optimizer steps A is pruned: in each row, the
`prune_ratio` fraction of entries with the smallest |A_ij|·‖X_j‖ is set to zero, where ‖X_j‖ is an exponential
moving average (factor `beta`) of the norm of input feature j, gathered in the forward pass while training (Wanda's
score). Pruned entries may grow back; the score is recomputed each time. Init: LoRA's.
Hosts: Linear and Conv1D (the score needs input features). Saved as a PEFT LoRA (ranks per module in the
deltatune record).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from ..core.targeting import LAYER_CONTAINERS, layer_index
from .lora import LoraConfig, LoraDelta, pattern_value
from .lora_peft import lora_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriloraConfig(LoraConfig):
    """LoRA's fields (r: the rank of the last layer), plus:
    r_min: the rank of the first layer. num_layers: the model's layer count (None: every module gets r).
    prune_every: optimizer steps between prunings (0: never). prune_ratio: fraction of each row of A set to zero.
    beta: EMA factor of the input-norm statistics.
    """

    r: int = 12
    r_min: int = 4
    num_layers: int | None = None
    prune_every: int = 10
    prune_ratio: float = 0.1
    beta: float = 0.9

    def validate(self) -> None:
        super().validate()
        if not 0 < self.r_min <= self.r:
            raise DeltatuneError(f"prilora: need 0 < r_min <= r, got r_min={self.r_min}, r={self.r}")
        if not 0 <= self.prune_ratio < 1 or not 0 <= self.beta < 1 or self.prune_every < 0:
            raise DeltatuneError("prilora: prune_ratio and beta must be in [0, 1) and prune_every >= 0")
        if self.num_layers is not None and self.num_layers < 1:
            raise DeltatuneError(f"prilora: num_layers must be >= 1, got {self.num_layers}")
        if self.init not in ("default", "gaussian"):
            raise DeltatuneError("prilora: init must be 'default' or 'gaussian'")

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.depth_rank(path))

    def depth_rank(self, path: str) -> int:
        index = layer_index(path, self.layers_pattern)
        return self.r if index is None else self.rank_of_layer(index)

    def rank_of_layer(self, index: int) -> int:
        if self.num_layers is None or self.num_layers == 1:
            return self.r
        fraction = min(index, self.num_layers - 1) / (self.num_layers - 1)
        return self.r_min + round((self.r - self.r_min) * fraction)


class PriloraDelta(LoraDelta):
    """LoRA with a depth-dependent rank and periodic Wanda-style pruning of A."""

    def __init__(self, config: PriloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.register_buffer("input_norm", torch.zeros(info.in_features), persistent=False)
        self.seen = False

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.training:
            with torch.no_grad():
                norm = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0).sqrt().to(self.input_norm.dtype)
                beta = self.config.beta if self.seen else 0.0
                self.input_norm.mul_(beta).add_(norm, alpha=1 - beta)
                self.seen = True
        return super().forward(x, y, host)

    @torch.no_grad()
    def prune(self) -> None:
        """Zero the prune_ratio fraction of each row of A with the smallest |A_ij|·‖X_j‖."""
        k = int(self.config.prune_ratio * self.lora_A.shape[1])
        if k == 0 or not self.seen:
            return
        score = self.lora_A.abs() * self.input_norm
        drop = score.topk(k, dim=1, largest=False).indices
        self.lora_A.scatter_(1, drop, 0.0)

    @classmethod
    def after_step(cls, deltas: dict[str, PriloraDelta], step: int, total_steps: int) -> None:
        every = next(iter(deltas.values())).config.prune_every
        if every and step % every == 0:
            for delta in deltas.values():
                delta.prune()


def _peft_format() -> PeftFormat:
    """A PEFT LoRA whose rank_pattern spells out the depth ranks (one regex per layer index)."""
    lora = lora_peft_format(dora=False, claims=False)

    def to_peft(config: PriloraConfig) -> dict:
        out = lora.to_peft(config)
        containers = "|".join(config.layers_pattern if isinstance(config.layers_pattern, list) else
                              [config.layers_pattern] if config.layers_pattern else LAYER_CONTAINERS)
        depth = {rf"(?:{containers})\.{i}\..*": config.rank_of_layer(i) for i in range(config.num_layers or 0)}
        out["rank_pattern"] = {**out["rank_pattern"], **depth}  # PEFT takes the first matching key: the user's
        return out

    return PeftFormat("LORA", to_peft, lora.from_peft, lambda raw: False)


PAPER = "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation (Benedek & Wolf, 2024) https://arxiv.org/abs/2401.11316"
register_method("prilora", config=PriloraConfig, family="rank-allocation", paper=PAPER, hosts=LINEAR_KINDS,
                peft=_peft_format())(PriloraDelta)
