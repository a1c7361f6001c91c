"""SparseAdapter: "SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters", He et al.,
2022, https://arxiv.org/abs/2210.04284

A bottleneck adapter (sequential, as Pfeiffer / Houlsby) pruned at initialisation and trained sparse:
    h + σ(h·(M_down ⊙ W_down)ᵀ + b_down)·(M_up ⊙ W_up)ᵀ + b_up,
with fixed binary masks M that keep a fraction 1 − sparsity of each projection's weights. The masks are drawn when
the adapter is attached (random scores from `seed` and the module path), or re-drawn before training from SNIP scores
|∂L/∂W ⊙ W| on one batch with `snip_prune(model, loss_fn, name)` (the paper's best pruning criterion). Masks are saved
with the adapter, so a loaded adapter keeps its sparsity pattern. Large-Sparse (a wider adapter at the same budget)
is a larger r with a higher sparsity.
Init: "houlsby" by default (small non-zero weights, which SNIP needs to score), or "identity".
Parameters: the dense count r·d + r + d·r + d (masked entries stay parameters with zero gradient); the non-zero
count is (1 − sparsity)·2·r·d + r + d.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.registry import register_method
from ..core.slot import slots_of
from .bottleneck import SEQUENTIAL_HOSTS, BottleneckConfig, SequentialBottleneckDelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseAdapterConfig(BottleneckConfig):
    """Attributes (besides BottleneckConfig's):
    sparsity: fraction of each projection's weights pruned (0 ≤ sparsity < 1).
    seed: seed of the random masks drawn at attach time.
    """

    sparsity: float = 0.4
    seed: int = 0
    init: Literal["identity", "houlsby"] = "houlsby"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.sparsity < 1.0:
            raise DeltatuneError(f"sparse_adapter: sparsity must be in [0, 1), got {self.sparsity}")


def keep_top(scores: Tensor, sparsity: float) -> Tensor:
    """A 0/1 mask keeping the round((1 − sparsity)·numel) highest scores (at least one)."""
    keep = max(1, round((1.0 - sparsity) * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    mask[scores.flatten().topk(keep).indices] = 1.0
    return mask.view_as(scores)


class SparseAdapterDelta(SequentialBottleneckDelta):
    """A sequential bottleneck adapter with fixed masks on both projections."""

    identity_at_init = False  # near-identity "houlsby" init by default, which SNIP needs

    def make_parameters(self, config: SparseAdapterConfig) -> None:
        super().make_parameters(config)
        generator = torch.Generator().manual_seed(config.seed + zlib.crc32(self.path.encode()))
        self.register_buffer("down_mask", keep_top(torch.rand(self.down.shape, generator=generator), config.sparsity))
        self.register_buffer("up_mask", keep_top(torch.rand(self.up.shape, generator=generator), config.sparsity))

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.down * self.down_mask, self.down_bias, self.up * self.up_mask, self.up_bias


def snip_prune(model: nn.Module, loss_fn: Callable[[], Tensor], name: str = "default") -> None:
    """Re-draw adapter `name`'s masks from SNIP scores |∂L/∂W ⊙ W| with all masks open; `loss_fn()` runs the model
    on one batch and returns a scalar loss."""
    deltas = [slot[name] for _, _, slot in slots_of(model)
              if name in slot and isinstance(slot[name], SparseAdapterDelta)]
    if not deltas:
        raise DeltatuneError(f"snip_prune: model has no sparse_adapter named {name!r}; attach one first")
    with torch.no_grad():
        for delta in deltas:
            delta.down_mask.fill_(1.0)
            delta.up_mask.fill_(1.0)
    weights = [w for d in deltas for w in (d.down, d.up)]
    grads = torch.autograd.grad(loss_fn(), weights, allow_unused=True)
    with torch.no_grad():
        for i, delta in enumerate(deltas):
            for weight, grad, mask in ((delta.down, grads[2 * i], delta.down_mask),
                                       (delta.up, grads[2 * i + 1], delta.up_mask)):
                scores = (torch.zeros_like(weight) if grad is None else grad * weight).abs()
                mask.copy_(keep_top(scores, delta.config.sparsity))


PAPER = ("SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters (He et al., 2022) "
         "https://arxiv.org/abs/2210.04284")
register_method("sparse_adapter", config=SparseAdapterConfig, family="bottleneck", paper=PAPER,
                hosts=SEQUENTIAL_HOSTS)(SparseAdapterDelta)
