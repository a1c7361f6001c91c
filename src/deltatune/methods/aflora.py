"""AFLoRA: "Adaptive Freezing of Low Rank Adaptation in Parameter Efficient Fine-Tuning of Large Models",
Kundu et al., 2024, https://arxiv.org/abs/2403.13269

Update rule (matrix view):  W' = W + diag(b)·B·diag(d)·A  with A (r, in) and B (out, r) Kaiming-initialised
projections and trainable feature-transformation vectors d (r) = 1 and b (out) = 0, so the model is unchanged at
step 0. The projections train at first and are frozen one by one (`after_step`): each keeps a freezing score, the
mean over its entries of the smoothed sensitivity |w·∂L/∂w| times its uncertainty (AdaLoRA's estimator); the
number of frozen projections follows a cubic schedule from 0 after `tinit` steps to all of them at
`total_step − tfinal`, the lowest-scoring ones going first. A frozen projection stays frozen (requires_grad off, so
the optimizer skips it); d and b always train.
Saved tensors: lora_A, lora_B, aflora_d, aflora_b, in deltatune's own format.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .adalora import GradientTap, Sensitivity
from .factored import FactoredDelta, RankConfig, kaiming_

_PROJECTIONS = ("lora_A", "lora_B")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AfloraConfig(RankConfig):
    """Attributes (besides r, dropout):
    tinit / tfinal: steps before freezing starts / at the end when every projection is frozen.
    beta1, beta2: EMA factors of the sensitivity and its uncertainty. total_step: training length (None: the
    trainer's).
    """

    tinit: int = 0
    tfinal: int = 0
    beta1: float = 0.85
    beta2: float = 0.85
    total_step: int | None = None

    def validate(self) -> None:
        super().validate()
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.tinit < 0 or self.tfinal < 0:
            raise DeltatuneError("aflora: beta1, beta2 must be in (0, 1) and tinit, tfinal >= 0")


def frozen_fraction(step: int, total: int, tinit: int, tfinal: int) -> float:
    """The cubic freezing schedule: 0 until tinit, 1 from total − tfinal."""
    if step <= tinit:
        return 0.0
    span = max(1, total - tfinal - tinit)
    return 1.0 - max(0.0, 1.0 - (step - tinit) / span) ** 3


class AfloraDelta(FactoredDelta):
    """y = base(x) + b ⊙ B·(d ⊙ A·x)."""

    def __init__(self, config: AfloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config)
        self.lora_A = nn.Parameter(kaiming_(torch.empty(self.r, info.fan_in)))
        self.lora_B = nn.Parameter(kaiming_(torch.empty(info.out_features, self.r)))
        self.aflora_d = nn.Parameter(torch.ones(self.r))
        self.aflora_b = nn.Parameter(torch.zeros(info.out_features))
        self.tap, self.sensitivity = GradientTap(), Sensitivity(config.beta1, config.beta2)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.aflora_d.unsqueeze(1) * self.lora_A, self.aflora_b.unsqueeze(1) * self.lora_B

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        self.tap.watch(self)  # only registers hooks when gradients are being computed
        return super().forward(x, y, host)

    def freezing_score(self, name: str) -> float:
        param = getattr(self, name)
        return float(self.sensitivity.score(name, param).mean())

    def frozen(self, name: str) -> bool:
        return not getattr(self, name).requires_grad

    def freeze(self, name: str) -> None:
        param = getattr(self, name)
        param.requires_grad_(False)
        param.grad = None

    @classmethod
    def after_step(cls, deltas: dict[str, AfloraDelta], step: int, total_steps: int) -> None:
        config = next(iter(deltas.values())).config
        total = config.total_step or total_steps
        live = [(d, n) for d in deltas.values() for n in _PROJECTIONS if not d.frozen(n)]
        for delta, name in live:
            delta.sensitivity.update(delta, delta.tap, (name,))
        wanted = round(frozen_fraction(step, total, config.tinit, config.tfinal) * 2 * len(deltas))
        already = 2 * len(deltas) - len(live)
        for delta, name in sorted(live, key=lambda dn: dn[0].freezing_score(dn[1]))[: max(0, wanted - already)]:
            delta.freeze(name)

    @classmethod
    def num_parameters(cls, config: AfloraConfig, info: HostInfo, path: str) -> int:
        return config.r * (info.fan_in + info.out_features + 1) + info.out_features


PAPER = ("AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter Efficient Fine-Tuning of Large Models "
         "(Kundu et al., 2024) https://arxiv.org/abs/2403.13269")
register_method("aflora", config=AfloraConfig, family="rank-allocation", paper=PAPER)(AfloraDelta)
