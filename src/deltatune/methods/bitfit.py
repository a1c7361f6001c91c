"""BitFit: train only the bias terms.

"BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", Ben Zaken et al.,
2021, https://arxiv.org/abs/2106.10199

Update rule (per output channel):  y' = W·x + (b + Δb);  ΔW = 0.
Init: Δb = 0, so the model is unchanged at step 0.
Shapes: Δb (out_features,) on every adapted layer (for a LayerNorm: its width).

The update is kept as a delta on the bias, so it merges, unmerges and composes like any other delta. A layer without
a bias (Llama's projections, a LayerNorm built with bias=False) still gets a Δb: merging creates the bias. Norms whose
forward has no bias term at all (RMSNorm) cannot take one and are refused. The paper's variant that trains only the
query and middle-of-MLP biases is a choice of `targets`.

This module also holds the gathered per-row helper (`vector_rows`) that the other per-channel vector methods of
this family (IA³, LN-Tuning) use for mixed batches.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, per_channel
from ..core.registry import register_method
from ..core.slot import Host
from .factored import rows_per_channel, slot_index


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitfitConfig(DeltaConfig):
    """BitFit has no fields of its own: which biases train is a choice of `targets`."""


def vector_rows(vectors: list[Tensor | None], slots: Tensor, fill: float) -> Tensor:
    """(batch, n): row i gets vectors[slots[i]]; rows with slot -1, or whose vector is None, get `fill`."""
    ref = next(v for v in vectors if v is not None)
    filler = torch.full_like(ref, fill)
    table = torch.stack([filler if v is None else v for v in vectors] + [filler])  # (K+1, n)
    return table[slot_index(slots, len(vectors))]


class BitfitDelta(Delta):
    """y = base(x) + Δb."""

    def __init__(self, config: BitfitConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.bias_delta = nn.Parameter(torch.zeros(info.out_features))

    def setup(self, host: Host) -> None:
        module = host.module
        if self.info.kind == "norm" and not self.info.has_bias and not isinstance(module, nn.LayerNorm):
            raise DeltatuneError(
                f"bitfit: norm {self.path!r} ({type(module).__name__}) has no bias term in its forward, so a bias "
                "update could not be merged; exclude it from targets (or use ln_tuning)"
            )

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return y + per_channel(self.info, self.bias_delta.to(y.dtype), y.ndim)

    def delta_weight(self, host: Host) -> Tensor:
        return torch.zeros(self.info.weight_shape, dtype=self.bias_delta.dtype, device=self.bias_delta.device)

    def delta_bias(self, host: Host) -> Tensor:
        return self.bias_delta

    @classmethod
    def num_parameters(cls, config: BitfitConfig, info: HostInfo, path: str) -> int:
        return info.out_features

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        rows = vector_rows([d.bias_delta for d in deltas], slots, 0.0)  # (batch, out)
        return y + rows_per_channel(host.info, rows.to(y.dtype), y.ndim)


PAPER = ("BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models "
         "(Ben Zaken et al., 2021) https://arxiv.org/abs/2106.10199")

# Embeddings have no bias in their forward; every other weight host and LayerNorm-style norms do.
register_method("bitfit", config=BitfitConfig, family="selective", paper=PAPER,
                hosts=(*LINEAR_KINDS, *CONV_KINDS, "norm"))(BitfitDelta)
