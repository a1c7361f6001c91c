"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", Liu et al., 2022,
https://arxiv.org/abs/2205.05638

Update rule: a learned vector rescales activations. On most layers it scales the output (the paper's l_k, l_v on the
attention keys and values):  y' = l ⊙ (W·x + b),  i.e.  ΔW = diag(l − 1)·W,  Δb = (l − 1) ⊙ b.
On feed-forward output layers it scales the input (the paper's l_ff on the FFN's inner activation):
y' = W·(l ⊙ x) + b,  i.e.  ΔW = W·diag(l − 1)  (each input channel's kernel columns scaled together).
Init: l = 1, so the model is unchanged at step 0.
Shapes: l (out_features,) for output scaling, (in_features,) for input scaling; on disk as PEFT's `ia3_l`:
(out, 1) / (1, in) for Linear and transformers Conv1D, (1, channels, 1, ...) for convolutions.

Which layers scale their input is chosen as in PEFT: `feedforward_modules` is a regex that fully matches the module
path, or a list of names the path ends with (plain string suffix, as PEFT). Embeddings (output scaling only) and
Conv1d are supported beyond PEFT. Several active (IA)³ adapters compose additively (Σ(lᵢ − 1) + 1), where PEFT
multiplies their vectors; a single adapter is identical in both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Union

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, from_matrix, per_channel, to_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .bitfit import vector_rows
from .factored import refuse_unknown_peft_fields, rows_per_channel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ia3Config(DeltaConfig):
    """Attributes:
    feedforward_modules: modules whose input (not output) is scaled — the FFN output layers (`down_proj`,
        `mlp.c_proj`, ...): a regex fully matching the module path, or a list of names the path ends with. None or
        [] scales every adapted layer's output.
    """

    feedforward_modules: Union[str, list[str], None] = None

    def validate(self) -> None:
        super().validate()
        spec = self.feedforward_modules
        if isinstance(spec, list) and any(not name for name in spec):
            raise DeltatuneError(f"ia3: feedforward_modules has an empty name in {spec!r}; remove it")
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as err:
                raise DeltatuneError(f"ia3: feedforward_modules {spec!r} is not a valid regex ({err})") from None

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a string fully matches the path; a list entry is a suffix of it."""
        spec = self.feedforward_modules
        if spec is None:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, path) is not None
        return any(path.endswith(name) for name in spec)


def scale_matrix(info: HostInfo, weight: Tensor, factor: Tensor, feedforward: bool) -> Tensor:
    """factor applied to W's rows (output side) or input-channel columns (input side), native layout in and out."""
    matrix = to_matrix(info, weight)  # (out, fan_in)
    if feedforward:
        return from_matrix(info, matrix * factor.repeat_interleave(math.prod(info.kernel_size)).unsqueeze(0))
    return from_matrix(info, factor.unsqueeze(1) * matrix)


class Ia3Delta(Delta):
    """Output side: y + (l − 1) ⊙ (W₀x + b₀);  input side: y + W₀((l − 1) ⊙ x)."""

    uses_base_weight = True

    def __init__(self, config: Ia3Config, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.feedforward = config.is_feedforward(path)
        if self.feedforward and info.kind == "embedding":
            raise DeltatuneError(
                f"ia3: {path!r} is an embedding, whose input is token ids and cannot be scaled; remove it from "
                "feedforward_modules (its output can be scaled)"
            )
        self.ia3_l = nn.Parameter(torch.ones(info.in_features if self.feedforward else info.out_features))

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        factor = self.ia3_l - 1
        if self.feedforward:
            return y + input_scaled_output(x, per_channel(self.info, factor, x.ndim), host).to(y.dtype)
        return y + (per_channel(self.info, factor, y.ndim) * biased_base_output(x, host, factor.dtype)).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        weight = host.weight().to(self.ia3_l.dtype)
        return scale_matrix(self.info, weight, self.ia3_l - 1, self.feedforward)

    def delta_bias(self, host: Host) -> Tensor | None:
        bias = host.bias()
        if self.feedforward or bias is None:
            return None
        return (self.ia3_l - 1) * bias.to(self.ia3_l.dtype)

    @classmethod
    def num_parameters(cls, config: Ia3Config, info: HostInfo, path: str) -> int:
        return info.in_features if config.is_feedforward(path) else info.out_features

    # ---- on disk: PEFT's `ia3_l` and its shapes -----------------------------------------------------------------
    def peft_shape(self) -> tuple[int, ...]:
        n = self.ia3_l.numel()
        if self.info.kind in CONV_KINDS:
            return (1, n, *([1] * len(self.info.kernel_size)))
        return (1, n) if self.feedforward else (n, 1)

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l.detach().reshape(self.peft_shape())}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            self.ia3_l.copy_(tensors["ia3_l"].reshape(-1))

    # ---- mixed batches: per-row vectors gathered, one base pass per side ------------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        info = host.info
        out_side = [None if d.feedforward else d.ia3_l - 1 for d in deltas]
        in_side = [d.ia3_l - 1 if d.feedforward else None for d in deltas]
        if any(v is not None for v in out_side):
            factor = vector_rows(out_side, slots, 0.0)  # (batch, out)
            base = biased_base_output(x, host, factor.dtype)
            y = y + (rows_per_channel(info, factor, y.ndim) * base).to(y.dtype)
        if any(v is not None for v in in_side):
            factor = vector_rows(in_side, slots, 0.0)  # (batch, in)
            y = y + input_scaled_output(x, rows_per_channel(info, factor, x.ndim), host).to(y.dtype)
        return y


def biased_base_output(x: Tensor, host: Host, dtype: torch.dtype) -> Tensor:
    """W₀x + b₀ (the unmerged base layer's output) in `dtype`."""
    base = host.base_output(x).to(dtype)
    bias = host.bias()
    return base if bias is None else base + per_channel(host.info, bias.to(dtype), base.ndim)


def input_scaled_output(x: Tensor, factor: Tensor, host: Host) -> Tensor:
    """W₀(factor ⊙ x) without bias; `factor` already shaped to broadcast against x."""
    weight = host.weight()
    scaled = (x.to(factor.dtype) * factor).to(weight.dtype)
    return host.apply(scaled, weight)


# ---- PEFT IA3Config <-> Ia3Config ---------------------------------------------------------------------------------
_PEFT_FIELDS = {"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}  # fan_in_fan_out: PEFT sets it per layer


def _to_peft(config: Ia3Config) -> dict:
    spec = config.feedforward_modules
    if isinstance(spec, list) and spec:
        # PEFT requires a list to be a subset of target_modules (saved as exact paths); its regex form has the same
        # meaning as the suffix list and no such check.
        spec = ".*(?:" + "|".join(re.escape(name) for name in spec) + ")"
    return {"feedforward_modules": spec if spec else [], "fan_in_fan_out": False, "init_ia3_weights": True}


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("IA3", raw, _PEFT_FIELDS)
    spec = raw.get("feedforward_modules")
    return {"feedforward_modules": list(spec) if isinstance(spec, (list, tuple, set)) else spec}


PAPER = ("Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning "
         "(Liu et al., 2022) https://arxiv.org/abs/2205.05638")

register_method("ia3", config=Ia3Config, family="scaling", paper=PAPER,
                hosts=(*LINEAR_KINDS, "embedding", *CONV_KINDS),
                peft=PeftFormat("IA3", _to_peft, _from_peft, lambda raw: True))(Ia3Delta)
