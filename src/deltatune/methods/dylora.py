"""DyLoRA: "Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation",
Valipour et al., 2023, https://arxiv.org/abs/2210.07558

Update rule at rank b ≤ r (matrix view):  W' = W + (alpha / b)·B[:, :b]·A[:b].
Training samples b uniformly from 1..r for every optimizer step (the same b for every layer; drawn from
(seed, step), so a run is reproducible) and, with update="last" (the paper's), only the b-th row of A and column of B
receive gradient — the first b − 1 are already trained for the smaller ranks. The result is one adapter that works
at every rank ≤ r: `set_rank(model, adapter, k)` (or the config's `eval_rank`) picks the rank used outside training;
truncated to k it is exactly the rank-k LoRA that was trained. Init: LoRA's (A Kaiming, B = 0).
Saved tensors: the full lora_A (r, in) and lora_B (out, r), in deltatune's own format.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .factored import FactoredDelta, ScaledRankConfig, kaiming_


@dataclasses.dataclass(frozen=True, kw_only=True)
class DyloraConfig(ScaledRankConfig):
    """Attributes (besides r = the largest rank, alpha, dropout):
    update: "last" (only the sampled b-th component trains, the paper's) or "all" (every component ≤ b).
    eval_rank: the rank used outside training (None: r).
    seed: seed of the rank sampling.
    """

    update: Literal["last", "all"] = "last"
    eval_rank: int | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise DeltatuneError(f"dylora: eval_rank must be in 1..r={self.r}, got {self.eval_rank}")


def sampled_rank(r: int, seed: int, step: int) -> int:
    """The rank b used at optimizer step `step` (0-based), uniform on 1..r."""
    return random.Random(f"{seed}:{step}").randint(1, r)


class DyloraDelta(FactoredDelta):
    """y = base(x) + (alpha / b)·B[:, :b]·A[:b]·x."""

    fast_parameters = ("lora_B",)
    gather_while_training = False  # the rank in use may differ between adapters of one batch while training

    def __init__(self, config: DyloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config)
        self.lora_A = nn.Parameter(kaiming_(torch.empty(self.r, info.fan_in)))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, self.r))
        self.train_rank = sampled_rank(self.r, config.seed, 0)
        self.eval_rank = config.eval_rank or self.r

    @property
    def rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def factor_state(self) -> tuple:
        return (self.rank, self.training)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        b = self.rank
        down, up = self.lora_A[:b], self.lora_B[:, :b]
        if self.training and self.config.update == "last" and b > 1:
            down = torch.cat([down[:-1].detach(), down[-1:]])
            up = torch.cat([up[:, :-1].detach(), up[:, -1:]], dim=1)
        return down, up * (self.config.alpha / b)

    @classmethod
    def after_step(cls, deltas: dict[str, DyloraDelta], step: int, total_steps: int) -> None:
        first = next(iter(deltas.values()))
        b = sampled_rank(first.r, first.config.seed, step)
        for delta in deltas.values():
            delta.train_rank = min(b, delta.r)

    @classmethod
    def num_parameters(cls, config: DyloraConfig, info: HostInfo, path: str) -> int:
        return config.r * (info.fan_in + info.out_features)


def set_rank(model: nn.Module, adapter: str, rank: int | None) -> None:
    """Use adapter `adapter` at rank `rank` (≤ its r) outside training; None restores the config's eval_rank."""
    deltas = [s[adapter] for _, _, s in slots_of(model) if adapter in s and isinstance(s[adapter], DyloraDelta)]
    if not deltas:
        raise DeltatuneError(f"set_rank: the model has no DyLoRA adapter named {adapter!r}")
    for delta in deltas:
        if rank is not None and not 1 <= rank <= delta.r:
            raise DeltatuneError(f"set_rank: rank must be in 1..{delta.r} for adapter {adapter!r}, got {rank}")
    for delta in deltas:
        delta.eval_rank = rank or delta.config.eval_rank or delta.r


PAPER = ("DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation "
         "(Valipour et al., 2023) https://arxiv.org/abs/2210.07558")
register_method("dylora", config=DyloraConfig, family="rank-allocation", paper=PAPER)(DyloraDelta)
