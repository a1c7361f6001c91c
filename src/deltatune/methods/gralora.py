"""GraLoRA: "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning", Jung et al., 2025,
https://arxiv.org/abs/2505.20355

Update rule (matrix view, W of shape out × in cut into a k × k grid of (out/k) × (in/k) blocks):
    ΔW_ij = s·B_ij·A_ij   for every block (i, j),   s = alpha / (r + hybrid_r),
each block with its own rank-r/k adapter, so ΔW has rank up to k·r for LoRA's r·(in + out) parameters, and a
block's gradient only sees its own input channels. Hybrid GraLoRA adds a plain LoRA of rank hybrid_r:
ΔW += s·B_g·A_g.
Init: every A_ij Kaiming-uniform over its (r/k, in/k) block, B = 0, so the model is unchanged at step 0
("random": B Kaiming-uniform too, for tests).
Shapes (PEFT's layout, which is also the on-disk format): gralora_A (k, in/k, r), where columns
[i·r/k, (i+1)·r/k) of gralora_A[j] are A_ijᵀ; gralora_B (k, r, out/k), where rows [j·r/k, (j+1)·r/k) of
gralora_B[i] are B_ijᵀ; hybrid gralora_A_general (hybrid_r, in), gralora_B_general (out, hybrid_r).
k must divide r, in_features and out_features; `k_pattern` sets k per module (k = 1 is plain LoRA). PEFT has no
k_pattern: it reads an adapter saved here only where every module uses k.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import (FactoredDelta, check_rank_and_dropout, kaiming_, low_rank_output,
                       refuse_unknown_peft_fields)
from .lora import pattern_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraloraConfig(DeltaConfig):
    """Attributes:
    r: rank budget: each of the k×k blocks gets rank r/k (r·(in + out) parameters, as LoRA at rank r).
    alpha: scaling numerator: s = alpha / (r + hybrid_r).
    k: blocks per side of the grid (must divide r, in_features and out_features).
    hybrid_r: rank of the optional global LoRA added to the block update (0 = none).
    dropout: dropout probability on the adapter's input.
    init: "default" (B = 0) or "random" (B Kaiming-uniform; tests).
    k_pattern: module-path regex -> k, overriding k (PEFT's rule: first key matching the end of the path).
    """

    r: int = 8
    alpha: float = 16.0
    k: int = 2
    hybrid_r: int = 0
    dropout: float = 0.0
    init: Literal["default", "random"] = "default"
    k_pattern: dict[str, int] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout)
        if self.hybrid_r < 0:
            raise DeltatuneError(f"gralora: hybrid_r must be >= 0 (0 = no global LoRA), got {self.hybrid_r}")
        for where, k in [("k", self.k), *((f"k_pattern[{key!r}]", v) for key, v in self.k_pattern.items())]:
            if k <= 0 or self.r % k:
                raise DeltatuneError(f"gralora: {where}={k} must be > 0 and divide r={self.r}; pick k among the "
                                     "divisors of r")

    def k_for(self, path: str) -> int:
        return pattern_value(self.k_pattern, path, self.k)


def linear_inits(k: int, rows: int, cols: int, *, zero: bool = False) -> Tensor:
    """k independent (rows, cols) nn.Linear-style weights (Kaiming-uniform over cols), stored as (k, cols, rows)."""
    if zero:
        return torch.zeros(k, cols, rows)
    blocks = torch.stack([kaiming_(torch.empty(rows, cols)) for _ in range(k)])
    return blocks.transpose(1, 2).contiguous()


class GraloraDelta(FactoredDelta):
    """y = base(x) + s·[Σ_j B_ij A_ij x_j]_i (+ s·B_g A_g x)."""

    fast_parameters = ("gralora_B", "gralora_B_general")

    def __init__(self, config: GraloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        k, r = config.k_for(path), config.r
        if info.fan_in % k or info.out_features % k:
            raise DeltatuneError(
                f"gralora: k={k} must divide in_features={info.fan_in} and out_features={info.out_features} of "
                f"{path!r}; set k_pattern={{'{path.rsplit('.', 1)[-1]}': 1}} (or another divisor) for this module"
            )
        self.k, self.r = k, r
        self.scaling = config.alpha / (r + config.hybrid_r)
        self.dropout = config.dropout
        random = config.init == "random"
        self.gralora_A = nn.Parameter(linear_inits(k, r, info.fan_in // k))
        self.gralora_B = nn.Parameter(linear_inits(k, info.out_features // k, r, zero=not random))
        self.gralora_A_general = self.gralora_B_general = None
        if config.hybrid_r:
            self.gralora_A_general = nn.Parameter(kaiming_(torch.empty(config.hybrid_r, info.fan_in)))
            b_general = torch.empty(info.out_features, config.hybrid_r)
            self.gralora_B_general = nn.Parameter(kaiming_(b_general) if random else b_general.zero_())

    def _blocks(self) -> tuple[Tensor, Tensor]:
        """A as (j, in/k, i, r/k) and B as (i, j, r/k, out/k): block (i, j) is B[i, j]ᵀ·A[j, :, i]ᵀ."""
        k, q = self.k, self.r // self.k
        return self.gralora_A.reshape(k, -1, k, q), self.gralora_B.reshape(k, k, q, -1)

    def block_update(self) -> Tensor:
        """The k×k block update Σ B_ij A_ij as an (out, in) matrix, unscaled."""
        a, b = self._blocks()
        return torch.einsum("ijqm,jniq->imjn", b, a).reshape(self.info.out_features, self.info.fan_in)

    def delta_weight(self, host: Host) -> Tensor:
        update = self.block_update()
        if self.gralora_A_general is not None:
            update = update + self.gralora_B_general @ self.gralora_A_general
        return from_matrix(self.info, update * self.scaling)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS:
            return super().forward(x, y, host)
        x = self.dropped(x).to(self.gralora_A.dtype)
        k, lead = self.k, x.shape[:-1]
        h = torch.einsum("...jn,jnr->...jr", x.reshape(*lead, k, -1), self.gralora_A)  # (..., j, r) with r = (i, q)
        h = h.reshape(*lead, k, k, -1).transpose(-3, -2).reshape(*lead, k, self.r)  # (..., i, (j, q))
        out = torch.einsum("...ir,irm->...im", h, self.gralora_B).reshape(*lead, -1)  # (..., out)
        if self.gralora_A_general is not None:
            out = out + low_rank_output(x, host, self.gralora_A_general, self.gralora_B_general)
        return y + (out * self.scaling).to(y.dtype)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """The block update as one rank-k·r LoRA: A_ij placed at input block j, B_ij at output block i."""
        a, b = self._blocks()
        eye = torch.eye(self.k, dtype=a.dtype, device=a.device)
        down = torch.einsum("jniq,jl->ijqln", a, eye).reshape(-1, self.info.fan_in)
        up = torch.einsum("ijqm,li->lmijq", b, eye).reshape(self.info.out_features, -1)
        if self.gralora_A_general is not None:
            down = torch.cat([down, self.gralora_A_general])
            up = torch.cat([up, self.gralora_B_general], dim=1)
        return down, up * self.scaling

    @classmethod
    def num_parameters(cls, config: GraloraConfig, info: HostInfo, path: str) -> int:
        return (config.r + config.hybrid_r) * (info.fan_in + info.out_features)

    # ---- on disk: PEFT's tensor names -----------------------------------------------------------------------------
    _KEYS = {"gralora_A": "gralora_A", "gralora_B": "gralora_B",
             "gralora_A_general.weight": "gralora_A_general", "gralora_B_general.weight": "gralora_B_general"}

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        own = {key: getattr(self, name) for key, name in self._KEYS.items()}
        return {key: t.detach() for key, t in own.items() if t is not None}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            for key, value in tensors.items():
                getattr(self, self._KEYS[key]).copy_(value)


# ---- PEFT GraloraConfig <-> ours ----------------------------------------------------------------------------------
_PEFT_FIELDS = {"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout", "init_weights", "bias", "fan_in_fan_out"}


def _to_peft(config: GraloraConfig) -> dict[str, Any]:
    return {"r": config.r, "alpha": config.alpha, "gralora_k": config.k, "hybrid_r": config.hybrid_r,
            "gralora_dropout": config.dropout, "init_weights": config.init == "default", "bias": "none",
            "fan_in_fan_out": False}


def _from_peft(raw: dict[str, Any]) -> dict[str, Any]:
    refuse_unknown_peft_fields("GraLoRA", raw, _PEFT_FIELDS)
    if raw.get("bias", "none") != "none":
        raise DeltatuneError(f"PEFT GraLoRA bias={raw['bias']!r} is not supported; deltatune supports 'none'")
    return {"r": raw.get("r", 32), "alpha": raw.get("alpha", 64), "k": raw.get("gralora_k", 2),
            "hybrid_r": raw.get("hybrid_r", 0), "dropout": raw.get("gralora_dropout", 0.0),
            "init": "default" if raw.get("init_weights", True) else "random"}


PEFT = PeftFormat("GRALORA", _to_peft, _from_peft, lambda raw: True)
PAPER = ("GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning (Jung et al., 2025) "
         "https://arxiv.org/abs/2505.20355")
register_method("gralora", config=GraloraConfig, family="low-rank", paper=PAPER,
                hosts=("linear", "conv1d_hf", "embedding"), peft=PEFT)(GraloraDelta)
