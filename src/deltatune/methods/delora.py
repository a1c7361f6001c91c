"""DeLoRA: "Decoupling Angles and Strength in Low-rank Adaptation", Bini, Girrbach and Akata, 2025,
https://arxiv.org/abs/2503.18225

Update rule (matrix view, W of shape out × in, b_i the columns of B, a_i the rows of A):
    ΔW = (λ / r)·Σ_i (b_i / ‖b_i‖)(a_i / ‖a_i‖)ᵀ · diag(‖W_{:,1}‖, …, ‖W_{:,in}‖)
Each rank-one direction is normalised, so the learnable boundary λ alone sets the strength: ‖ΔW‖_F ≤ |λ|·‖W‖₂
(every term has norm ≤ max_j ‖W_{:,j}‖ ≤ ‖W‖₂). The column norms of the pre-trained weight are measured once at
init and stored (as PEFT stores them), so ΔW does not move when the base weight is later merged into. The norms
‖a_i‖, ‖b_i‖ are clamped below at 1e-4 (as in PEFT), which keeps B = 0 well defined.
Init: A Kaiming-uniform, B = 0 (ΔW = 0 at step 0), λ = delora_lambda; "random": B Kaiming-uniform too (tests).
Shapes (PEFT's names, on disk too): delora_A (r, fan_in), delora_B (out, r), delora_lambda (1,), buffer
delora_w_norm (fan_in,).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo, to_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_rank_and_dropout, kaiming_, refuse_unknown_peft_fields
from .lora import pattern_value

NORM_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeloraConfig(DeltaConfig):
    """Attributes:
    r: rank of the update.
    delora_lambda: initial value of the trainable boundary λ (an upper bound on ‖ΔW‖ relative to ‖W‖).
    dropout: dropout probability on the adapter's input.
    init: "default" (Kaiming A, zero B) or "random" (B Kaiming-uniform too; tests).
    rank_pattern: module-path regex -> rank, overriding r.
    lambda_pattern: module-path regex -> initial λ, overriding delora_lambda.
    """

    r: int = 8
    delora_lambda: float = 15.0
    dropout: float = 0.0
    init: Literal["default", "random"] = "default"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    lambda_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout, self.rank_pattern)


class DeloraDelta(FactoredDelta):
    """y = base(x) + B·diag(λ / (r·‖a_i‖·‖b_i‖))·A·(‖W‖_col ⊙ dropout(x))."""

    fast_parameters = ("delora_B",)

    def __init__(self, config: DeloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = pattern_value(config.rank_pattern, path, config.r)
        self.check_rank(self.r)
        self.dropout = config.dropout
        self.delora_A = nn.Parameter(kaiming_(torch.empty(self.r, info.fan_in)))
        b = torch.empty(info.out_features, self.r)
        self.delora_B = nn.Parameter(kaiming_(b) if config.init == "random" else b.zero_())
        boundary = pattern_value(config.lambda_pattern, path, config.delora_lambda)
        self.delora_lambda = nn.Parameter(torch.tensor([float(boundary)]))
        self.register_buffer("delora_w_norm", torch.ones(info.fan_in))

    def setup(self, host: Host) -> None:
        self.delora_w_norm.copy_(torch.linalg.norm(to_matrix(self.info, host.weight()).float(), dim=0))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        a_norm = self.delora_A.norm(dim=1).clamp(min=NORM_FLOOR)
        b_norm = self.delora_B.norm(dim=0).clamp(min=NORM_FLOOR)
        strength = self.delora_lambda / self.r / (a_norm * b_norm)  # (r,)
        return self.delora_A * self.delora_w_norm, self.delora_B * strength

    @classmethod
    def num_parameters(cls, config: DeloraConfig, info: HostInfo, path: str) -> int:
        return pattern_value(config.rank_pattern, path, config.r) * (info.fan_in + info.out_features) + 1


# ---- PEFT DeloraConfig <-> ours -----------------------------------------------------------------------------------
_PEFT_FIELDS = {"r", "delora_lambda", "module_dropout", "init_weights", "rank_pattern", "lambda_pattern", "bias"}


def _to_peft(config: DeloraConfig) -> dict[str, Any]:
    return {"r": config.r, "delora_lambda": config.delora_lambda, "module_dropout": config.dropout,
            "init_weights": config.init == "default", "rank_pattern": dict(config.rank_pattern),
            "lambda_pattern": dict(config.lambda_pattern), "bias": "none"}


def _from_peft(raw: dict[str, Any]) -> dict[str, Any]:
    refuse_unknown_peft_fields("DeLoRA", raw, _PEFT_FIELDS)
    if raw.get("bias", "none") != "none":
        raise DeltatuneError(f"PEFT DeLoRA bias={raw['bias']!r} is not supported; deltatune supports 'none'")
    return {"r": raw.get("r", 8), "delora_lambda": raw.get("delora_lambda", 15),
            "dropout": raw.get("module_dropout", 0.0),
            "init": "default" if raw.get("init_weights", True) else "random",
            "rank_pattern": raw.get("rank_pattern") or {}, "lambda_pattern": raw.get("lambda_pattern") or {}}


PEFT = PeftFormat("DELORA", _to_peft, _from_peft, lambda raw: True)
PAPER = "Decoupling Angles and Strength in Low-rank Adaptation (Bini et al., 2025) https://arxiv.org/abs/2503.18225"
register_method("delora", config=DeloraConfig, family="low-rank", paper=PAPER, peft=PEFT)(DeloraDelta)
