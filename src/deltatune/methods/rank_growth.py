"""Ranks that grow (IncreLoRA) or move (ElaLoRA) during training, on AdaLoRA's SVD form P·diag(Λ ⊙ mask)·Q.

- IncreLoRA: "Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning", Zhang et al., 2023,
  https://arxiv.org/abs/2308.12043. Every module starts with `init_r` active triplets; every `delta_t` steps
  between `tinit` and `total_step − tfinal` the modules with the highest importance (mean AdaLoRA score of their
  active triplets) get one more triplet each, until the budget target_r × modules is reached on a linear schedule.
- ElaLoRA: "Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning", Chang et al., 2025,
  https://arxiv.org/abs/2504.00254. Same form, fixed total budget: every `delta_t` steps the `change` globally
  least important active triplets are pruned and as many are added to the most important modules; `change`
  decays to 0 on a cubic schedule by `total_step − tfinal`.
Both allocate a capacity of `max_r` triplets per module up front and move a mask: inactive triplets get no
gradient (their Λ is masked out), and an activated triplet starts with Λ = 0, so growth never changes the output.
The optimizer therefore never sees new parameters (the papers resize the matrices and the optimizer state).
Parameters counted: the capacity, max_r·(in + out + 1) per module. Saved tensors: lora_A, lora_B, lora_E and the
mask (`rank_mask`), in deltatune's own format.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .adalora import AdaloraConfig, SvdFormDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankGrowthConfig(AdaloraConfig):
    """AdaLoRA's fields (init_r: active triplets at the start; target_r: the average the budget ends at), plus:
    max_r: triplets allocated per module (the most a module can hold).
    """

    init_r: int = 2
    target_r: int = 4
    max_r: int = 8
    delta_t: int = 10

    def validate(self) -> None:
        super().validate()
        target = self.target_r if type(self) is RankGrowthConfig else self.init_r  # ElaLoRA keeps its budget
        if not self.init_r <= self.max_r or target > self.max_r:
            raise DeltatuneError(f"{self.method}: need init_r <= max_r and target_r <= max_r, got init_r="
                                 f"{self.init_r}, target_r={self.target_r}, max_r={self.max_r}")

    def rank_for(self, path: str) -> int:
        return self.max_r


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElaloraConfig(RankGrowthConfig):
    """RankGrowthConfig's fields (target_r is unused: the budget stays Σ init_r), plus:
    change: triplets pruned and added at the first reallocation (decays to 0).
    """

    init_r: int = 4
    change: int = 4


class RankGrowthDelta(SvdFormDelta):
    """ΔW = s/init_r · P·diag(Λ ⊙ mask)·Q with a mask that grows (IncreLoRA)."""

    masked = True

    def __init__(self, config: RankGrowthConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path, config.max_r, active=config.init_r)

    @property
    def active(self) -> int:
        return int(self.mask.sum())

    def module_score(self) -> float:
        scores = self.triplet_scores()[self.mask]
        return float(scores.mean()) if scores.numel() else 0.0

    @torch.no_grad()
    def grow(self) -> bool:
        """Activate the next free triplet with Λ = 0 (the output does not change); False at capacity."""
        free = (~self.mask).nonzero()
        if free.numel() == 0:
            return False
        i = int(free[0])
        self.lora_E[i] = 0.0
        self.mask[i] = True
        return True

    @torch.no_grad()
    def prune(self, i: int) -> None:
        self.mask[i] = False
        self.lora_E[i] = 0.0

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(), "lora_E": self.lora_E.detach(),
                "rank_mask": self.mask.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            for name, value in tensors.items():
                (self.mask if name == "rank_mask" else getattr(self, name)).copy_(value)

    @classmethod
    def after_step(cls, deltas: dict[str, RankGrowthDelta], step: int, total_steps: int) -> None:
        config = next(iter(deltas.values())).config
        total = config.total_step or total_steps
        end = total - config.tfinal
        if step > end:
            return
        for delta in deltas.values():
            delta.track()
        if step > config.tinit and (step % config.delta_t == 0 or step == end):
            cls.reallocate(deltas, config, (step - config.tinit) / max(1, end - config.tinit))

    @classmethod
    def reallocate(cls, deltas: dict[str, RankGrowthDelta], config, progress: float) -> None:
        """IncreLoRA: grow the most important modules until the linear budget for `progress` is met."""
        start = config.init_r * len(deltas)
        wanted = start + math.ceil((config.target_r * len(deltas) - start) * min(progress, 1.0))
        grow_most_important(deltas, wanted - sum(d.active for d in deltas.values()))


def grow_most_important(deltas: dict[str, RankGrowthDelta], count: int) -> None:
    """Add `count` triplets, one per module in order of importance, going round again while modules have room."""
    order = sorted(deltas.values(), key=lambda d: -d.module_score())
    while count > 0:
        grown = 0
        for delta in order:
            if grown == count:
                break
            grown += delta.grow()
        if grown == 0:
            return
        count -= grown


class ElaloraDelta(RankGrowthDelta):
    """ΔW = s/init_r · P·diag(Λ ⊙ mask)·Q with a mask that moves between modules (ElaLoRA)."""

    @classmethod
    def reallocate(cls, deltas: dict[str, ElaloraDelta], config, progress: float) -> None:
        change = round(config.change * (1 - min(progress, 1.0)) ** 3)
        if change <= 0:
            return
        candidates = []  # (score, path, index) of every active triplet whose module keeps at least one
        for path, delta in deltas.items():
            scores = delta.triplet_scores()
            candidates += [(float(scores[i]), path, int(i)) for i in delta.mask.nonzero().view(-1)]
        candidates.sort()
        pruned = 0
        for _, path, i in candidates:
            if pruned == change:
                break
            if deltas[path].active > 1:
                deltas[path].prune(i)
                pruned += 1
        grow_most_important(deltas, pruned)


PAPER_INCRE = ("IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning (Zhang et al., "
               "2023) https://arxiv.org/abs/2308.12043")
PAPER_ELA = ("ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning (Chang et al., 2025) "
             "https://arxiv.org/abs/2504.00254")
register_method("increlora", config=RankGrowthConfig, family="rank-allocation", paper=PAPER_INCRE)(RankGrowthDelta)
register_method("elalora", config=ElaloraConfig, family="rank-allocation", paper=PAPER_ELA)(ElaloraDelta)
