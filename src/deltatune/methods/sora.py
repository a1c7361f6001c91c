"""SoRA: "Sparse Low-rank Adaptation of Pre-trained Language Models", Ding et al., 2023,
https://arxiv.org/abs/2311.11696

Update rule (matrix view):  W' = W + s·B·diag(g)·A,  s = alpha / r, with a gate g ∈ R^r between the factors.
Init: LoRA's (A Kaiming, B = 0) and g = 1, so the model is unchanged at step 0. The gate is trained by proximal
gradient descent on λ‖g‖₁: after every optimizer step (`after_step`), g ← sign(g)·max(|g| − τ, 0) with
τ = `threshold` (the paper's η·λ); the threshold can grow linearly over training ("sparsifying scheduler",
`schedule="linear"`). Gates that reach 0 stay 0 unless the gradient brings them back; the rank in use is the number
of non-zero gates, and `effective_ranks` / the merged weight drop the others.
Saved tensors: lora_A, lora_B, lora_gate, in deltatune's own format.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .factored import FactoredDelta, ScaledRankConfig, kaiming_


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoraConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    threshold: the proximal step τ = η·λ applied to the gate after every optimizer step.
    schedule: "constant" τ, or "linear" (τ grows from 0 to `threshold` over training).
    """

    threshold: float = 1e-3
    schedule: Literal["constant", "linear"] = "constant"

    def validate(self) -> None:
        super().validate()
        if self.threshold < 0:
            raise DeltatuneError(f"sora: threshold must be >= 0, got {self.threshold}")


def soft_threshold(values: Tensor, tau: float) -> Tensor:
    """The proximal operator of τ‖·‖₁."""
    return values.sign() * (values.abs() - tau).clamp_min(0)


class SoraDelta(FactoredDelta):
    """y = base(x) + s·B·diag(g)·A·x."""

    fast_parameters = ("lora_B",)

    def __init__(self, config: SoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config)
        self.lora_A = nn.Parameter(kaiming_(torch.empty(self.r, info.fan_in)))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, self.r))
        self.lora_gate = nn.Parameter(torch.ones(self.r))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.lora_gate.unsqueeze(1) * self.lora_A, self.lora_B * self.scaling

    @classmethod
    def after_step(cls, deltas: dict[str, SoraDelta], step: int, total_steps: int) -> None:
        config = next(iter(deltas.values())).config
        tau = config.threshold * (min(step / max(total_steps, 1), 1.0) if config.schedule == "linear" else 1.0)
        with torch.no_grad():
            for delta in deltas.values():
                delta.lora_gate.copy_(soft_threshold(delta.lora_gate, tau))

    @classmethod
    def num_parameters(cls, config: SoraConfig, info: HostInfo, path: str) -> int:
        return config.r * (info.fan_in + info.out_features + 1)


def effective_ranks(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """{module path: number of non-zero gates} of a SoRA adapter: the rank each module really uses."""
    return {p: int((s[adapter].lora_gate != 0).sum()) for p, _, s in slots_of(model)
            if adapter in s and isinstance(s[adapter], SoraDelta)}


PAPER = "Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., 2023) https://arxiv.org/abs/2311.11696"
register_method("sora", config=SoraConfig, family="rank-allocation", paper=PAPER)(SoraDelta)
