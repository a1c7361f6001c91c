"""LN-Tuning: tune only the gains and biases of the normalisation layers.

"Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models", Qi et al., 2022,
https://arxiv.org/abs/2211.08682

Update rule (LayerNorm / RMSNorm with normalised input n(x)):  y' = (g + Δg) ⊙ n(x) + (b + Δb).
Init: Δg = 0, Δb = 0, so the model is unchanged at step 0.
Shapes: Δg (d,) and, when the norm has a bias, Δb (d,), d the normalised width.

On disk as PEFT's LN_TUNING, which keeps a trained copy of each norm: `ln_tuning_layers.weight` = g + Δg and
`ln_tuning_layers.bias` = b + Δb (the full values; deltatune stores the difference from the base and converts).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hosts import HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .bitfit import vector_rows
from .factored import refuse_unknown_peft_fields, rows_per_channel

_WEIGHT_KEY, _BIAS_KEY = "ln_tuning_layers.weight", "ln_tuning_layers.bias"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LnTuningConfig(DeltaConfig):
    """LN-Tuning has no fields of its own: every targeted norm trains its gain (and bias, if it has one)."""


class LnTuningDelta(Delta):
    """y = base(x) + Δg ⊙ n(x) + Δb, n(x) computed by the norm module itself."""

    def __init__(self, config: LnTuningConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        width = info.out_features
        self.weight_delta = nn.Parameter(torch.zeros(width))
        self.bias_delta = nn.Parameter(torch.zeros(width)) if info.has_bias else None

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        out = y + host.apply(x, self.weight_delta.to(x.dtype)).to(y.dtype)
        return out if self.bias_delta is None else out + self.bias_delta.to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        return self.weight_delta

    def delta_bias(self, host: Host) -> Tensor | None:
        return self.bias_delta

    @classmethod
    def num_parameters(cls, config: LnTuningConfig, info: HostInfo, path: str) -> int:
        return info.out_features * (2 if info.has_bias else 1)

    # ---- on disk: PEFT keeps the tuned norm's full parameters ---------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        out = {_WEIGHT_KEY: host.weight().to(self.weight_delta.dtype) + self.weight_delta}
        if self.bias_delta is not None:
            out[_BIAS_KEY] = host.bias().to(self.bias_delta.dtype) + self.bias_delta
        return {k: v.detach() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            self.weight_delta.copy_(tensors[_WEIGHT_KEY] - host.weight().to(self.weight_delta.dtype))
            if self.bias_delta is not None:
                self.bias_delta.copy_(tensors[_BIAS_KEY] - host.bias().to(self.bias_delta.dtype))

    # ---- mixed batches: n(x) once, per-row Δg and Δb gathered ---------------------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        info = host.info
        ones = torch.ones(info.out_features, dtype=x.dtype, device=x.device)
        normed = host.apply(x, ones)  # n(x): the norm with unit gain and no bias
        gains = vector_rows([d.weight_delta for d in deltas], slots, 0.0)  # (batch, d)
        out = y + (rows_per_channel(info, gains, normed.ndim) * normed.to(gains.dtype)).to(y.dtype)
        biases = [d.bias_delta for d in deltas]
        if any(b is not None for b in biases):
            out = out + rows_per_channel(info, vector_rows(biases, slots, 0.0), out.ndim).to(y.dtype)
        return out


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("LN_TUNING", raw, ())
    return {}


PAPER = ("Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models "
         "(Qi et al., 2022) https://arxiv.org/abs/2211.08682")

register_method("ln_tuning", config=LnTuningConfig, family="selective", paper=PAPER, hosts=("norm",),
                peft=PeftFormat("LN_TUNING", lambda config: {}, _from_peft, lambda raw: True))(LnTuningDelta)
