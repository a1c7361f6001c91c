"""LoRA Dropout: "LoRA Dropout as a Sparsity Regularizer for Overfitting Control", Lin et al., 2024,
https://arxiv.org/abs/2404.09610

Update rule while training (matrix view):  W' = W + s·(diag(m_out)·B)·(A·diag(m_in)),  with m_in (in) and m_out (out)
Bernoulli(1 − p) / (1 − p) masks drawn for every forward pass: whole columns of A and rows of B are dropped, a
sparsity regulariser on the factors themselves (LoRA's own dropout acts on each input element instead). Outside
training the masks are off and the adapter is a plain LoRA — its expected update. The paper's test-time ensemble
(`ensemble(model, run, n)`) instead averages n forward passes with freshly drawn masks.
Init: LoRA's. Saved as a PEFT LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .factored import check_dropout
from .lora import LoraConfig, LoraDelta
from .lora_peft import lora_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraDropoutConfig(LoraConfig):
    """LoRA's fields, plus:
    param_dropout: probability p of dropping a column of A / a row of B.
    """

    param_dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_dropout(self.method, self.param_dropout, "param_dropout")
        if self.init not in ("default", "gaussian"):
            raise DeltatuneError("lora_dropout: init must be 'default' or 'gaussian'")


class LoraDropoutDelta(LoraDelta):
    """LoRA whose factors are masked column-/row-wise in every training forward pass."""

    gather_while_training = False  # each adapter draws its own masks

    def __init__(self, config: LoraDropoutConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.sample_at_eval = False
        self.masks: tuple[Tensor, Tensor] | None = None

    def sampling(self) -> bool:
        return self.config.param_dropout > 0 and (self.training or self.sample_at_eval)

    def draw_masks(self) -> tuple[Tensor, Tensor]:
        keep = 1.0 - self.config.param_dropout
        a, b = self.lora_A, self.lora_B
        m_in = torch.bernoulli(torch.full((a.shape[1],), keep, device=a.device, dtype=a.dtype)) / keep
        m_out = torch.bernoulli(torch.full((b.shape[0],), keep, device=b.device, dtype=b.dtype)) / keep
        return m_in, m_out

    def ab(self) -> tuple[Tensor, Tensor]:
        if self.masks is None:
            return self.lora_A, self.lora_B
        m_in, m_out = self.masks
        shape_in = (1, -1, *([1] * (self.lora_A.ndim - 2)))
        shape_out = (-1, *([1] * (self.lora_B.ndim - 1)))
        return self.lora_A * m_in.view(shape_in), self.lora_B * m_out.view(shape_out)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if not self.sampling():
            return super().forward(x, y, host)
        self.masks = self.draw_masks()
        try:
            return super().forward(x, y, host)
        finally:
            self.masks = None


@contextmanager
def sampled_masks(model: nn.Module):
    """Masks are drawn even in eval mode inside this block (for the test-time ensemble)."""
    deltas = [d for _, _, s in slots_of(model) for d in s.values() if isinstance(d, LoraDropoutDelta)]
    if not deltas:
        raise DeltatuneError("ensemble: the model has no lora_dropout adapter")
    for delta in deltas:
        delta.sample_at_eval = True
    try:
        yield
    finally:
        for delta in deltas:
            delta.sample_at_eval = False


@torch.no_grad()
def ensemble(model: nn.Module, run: Callable[[], Tensor], n: int = 8) -> Tensor:
    """The paper's test-time ensemble: the mean of `run()` (a forward pass returning a tensor, e.g. logits) over n
    draws of the dropout masks."""
    if n < 1:
        raise DeltatuneError(f"ensemble: n must be >= 1, got {n}")
    with sampled_masks(model):
        total = run()
        for _ in range(n - 1):
            total = total + run()
    return total / n


PAPER = ("LoRA Dropout as a Sparsity Regularizer for Overfitting Control (Lin et al., 2024) "
         "https://arxiv.org/abs/2404.09610")
register_method("lora_dropout", config=LoraDropoutConfig, family="low-rank", paper=PAPER,
                peft=lora_peft_format(dora=False, claims=False))(LoraDropoutDelta)
