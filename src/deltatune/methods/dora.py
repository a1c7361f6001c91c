"""DoRA: "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., 2024, https://arxiv.org/abs/2402.09353

Update rule (matrix view, per output channel c):  W'_c = m_c · (W + s·B·A)_c / ‖(W + s·B·A)_c‖.
The norm is treated as a constant in the backward pass (paper §4.3), as PEFT does.
Init: LoRA's (B = 0) and m = ‖W_c‖, so the model is unchanged at step 0.
Parameters: LoRA's plus the magnitude m (out_features,). Saved as PEFT's `lora_magnitude_vector`.

Several adapters compose additively: this delta contributes (k - 1)·W₀x + k·s·BAx with k = m / ‖W₀ + s·BA‖, which
is also what `delta_weight` returns, so merged and unmerged outputs agree for any set of active adapters. Mixed
batches gather k and the LoRA factors per row (PEFT has no DoRA mixed-batch path).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, per_channel, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from .factored import gathered_output, row_factors, rows_per_channel, slot_index
from .lora import LoraConfig, LoraDelta
from .lora_peft import lora_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoraConfig(LoraConfig):
    """LoRA's fields; `lora_bias` is not available (as in PEFT)."""

    def validate(self) -> None:
        super().validate()
        if self.lora_bias:
            raise DeltatuneError("dora: lora_bias=True is not supported with DoRA; use bias='lora_only' instead")


class DoraDelta(LoraDelta):
    """y = base(x) + (k - 1)·W₀x + k·s·B(A(x)),  k = m / ‖W₀ + s·BA‖ per output channel."""

    uses_base_weight = True

    def __init__(self, config: DoraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.magnitude = nn.Parameter(torch.ones(info.out_features))

    def setup(self, host: Host) -> None:
        super().setup(host)
        self.magnitude.copy_(self._column_norm(host))

    def _column_norm(self, host: Host) -> Tensor:
        weight = to_matrix(self.info, host.weight()).to(self.lora_A.dtype)
        combined = weight + self.update_matrix().detach()
        return torch.linalg.norm(combined, dim=1)

    def rescale(self, host: Host) -> Tensor:
        """k = m / ‖W₀ + s·BA‖ (out_features,), the norm detached from the graph."""
        return self.magnitude / self._column_norm(host).detach()

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        x_in = self.dropped(x)
        # With dropout the base term uses the dropped input too (as PEFT does while training).
        base = host.base_output(x) if x_in is x else host.apply(x_in, host.weight().to(self.lora_A.dtype))
        k = per_channel(self.info, self.rescale(host), y.ndim)
        out = y + ((k - 1) * base + k * self.lora_output(x_in, host)).to(y.dtype)
        bias = self.delta_bias(host)
        return out if bias is None else out + per_channel(self.info, bias.to(y.dtype), out.ndim)

    def delta_weight(self, host: Host) -> Tensor:
        weight = to_matrix(self.info, host.weight()).to(self.lora_A.dtype)
        combined = weight + self.update_matrix()
        k = self.magnitude / torch.linalg.norm(combined, dim=1)
        return from_matrix(self.info, k.unsqueeze(1) * combined - weight)

    @classmethod
    def num_parameters(cls, config: DoraConfig, info: HostInfo, path: str) -> int:
        return super().num_parameters(config, info, path) + info.out_features

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if not cls.gatherable(deltas, host):
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        lora, bias = gathered_output(row_factors(deltas, slots, host, cache), x, host)
        ks = cache.get("dora_k")
        if ks is None:
            one = torch.ones(host.info.out_features, dtype=lora.dtype, device=lora.device)
            ks = torch.stack([d.rescale(host) for d in deltas] + [one])
            if not torch.is_grad_enabled():
                cache["dora_k"] = ks
        k = rows_per_channel(host.info, ks[slot_index(slots, len(deltas))], lora.ndim)
        out = (k - 1) * host.base_output(x).to(lora.dtype) + k * lora
        if bias is not None:
            out = out + rows_per_channel(host.info, bias, lora.ndim)
        return y + out.to(y.dtype)

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        out = super().state_tensors(host)
        shape = (1, -1, *([1] * len(self.info.kernel_size))) if self.info.kind in CONV_KINDS else (-1,)
        out["lora_magnitude_vector"] = self.magnitude.detach().reshape(shape)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        rest = dict(tensors)
        magnitude = rest.pop("lora_magnitude_vector")
        super().load_state_tensors(rest, host)
        with torch.no_grad():
            self.magnitude.copy_(magnitude.reshape(-1))


PAPER = "DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024) https://arxiv.org/abs/2402.09353"
register_method("dora", config=DoraConfig, family="low-rank", paper=PAPER, peft=lora_peft_format(dora=True))(DoraDelta)
