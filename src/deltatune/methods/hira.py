"""HiRA: "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models", Huang, Ko, Zhuang,
Tang and Zhang, ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS (no arXiv version)

Update rule (matrix view, W0 of shape out × in):  W' = W0 + W0 ⊙ (B·A)
The Hadamard product with the frozen weight gives an update of rank up to rank(W0)·r, for LoRA's parameter count.
There is no scaling factor. ΔW depends on W0, so merging keeps what it added (`uses_base_weight`).
Init (PEFT's): A Kaiming-uniform, B = 0 ("gaussian": A normal with std 1/r); on an Embedding A = 0 and B normal.
"random": A and B both Kaiming-uniform (a non-identity start, for tests and PEFT parity).
Shapes (LoRA's, and PEFT's on disk): Linear / Conv1D hira_A (r, in), hira_B (out, r); Embedding hira_embedding_A
(r, vocab), hira_embedding_B (dim, r); ConvNd hira_A (r, in, *k), hira_B (out, r, 1, ..., 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hosts import HostInfo, from_matrix, to_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import add_dense, check_rank_and_dropout, dropped_input, kaiming_, refuse_unknown_peft_fields
from .lora import lora_matrix, lora_shapes, pattern_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiraConfig(DeltaConfig):
    """Attributes:
    r: rank of B·A (the update W0 ⊙ BA itself can have much higher rank).
    dropout: dropout probability on the adapter's input.
    init: "default" (Kaiming A, zero B), "gaussian" (N(0, 1/r) A, zero B) or "random" (non-zero B; tests).
    rank_pattern: module-path regex -> rank, overriding r.
    """

    r: int = 8
    dropout: float = 0.0
    init: Literal["default", "gaussian", "random"] = "default"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_rank_and_dropout(self, self.r, self.dropout, self.rank_pattern)


class HiraDelta(Delta):
    """y = base(x) + (W0 ⊙ BA)·dropout(x)."""

    uses_base_weight = True
    fast_parameters = ("hira_B",)

    def __init__(self, config: HiraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = pattern_value(config.rank_pattern, path, config.r)
        self.check_rank(self.r)
        self.dropout = config.dropout
        a_shape, b_shape = lora_shapes(info, self.r)
        self.hira_A = nn.Parameter(torch.empty(a_shape))
        self.hira_B = nn.Parameter(torch.empty(b_shape))
        with torch.no_grad():
            if config.init == "random":
                kaiming_(self.hira_A, self.hira_B)
            elif info.kind == "embedding":
                nn.init.zeros_(self.hira_A), nn.init.normal_(self.hira_B)
            else:
                nn.init.normal_(self.hira_A, std=1 / self.r) if config.init == "gaussian" else kaiming_(self.hira_A)
                nn.init.zeros_(self.hira_B)

    def delta_weight(self, host: Host) -> Tensor:
        base = to_matrix(self.info, host.weight()).to(self.hira_A.dtype)
        return from_matrix(self.info, base * lora_matrix(self.hira_A, self.hira_B, 1.0))

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return add_dense(dropped_input(self, x), y, host, self.delta_weight(host))

    @classmethod
    def num_parameters(cls, config: HiraConfig, info: HostInfo, path: str) -> int:
        return pattern_value(config.rank_pattern, path, config.r) * (info.fan_in + info.out_features)

    # ---- on disk: PEFT's tensor names -----------------------------------------------------------------------------
    def _keys(self) -> tuple[str, str]:
        return ("hira_embedding_A", "hira_embedding_B") if self.info.kind == "embedding" else ("hira_A", "hira_B")

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        a_key, b_key = self._keys()
        return {a_key: self.hira_A.detach(), b_key: self.hira_B.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        a_key, b_key = self._keys()
        with torch.no_grad():
            self.hira_A.copy_(tensors[a_key])
            self.hira_B.copy_(tensors[b_key])


# ---- PEFT HiraConfig <-> ours -------------------------------------------------------------------------------------
_PEFT_FIELDS = {"r", "hira_dropout", "init_weights", "rank_pattern", "fan_in_fan_out"}
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "random": False}


def _to_peft(config: HiraConfig) -> dict[str, Any]:
    return {"r": config.r, "hira_dropout": config.dropout, "init_weights": _INIT_TO_PEFT[config.init],
            "rank_pattern": dict(config.rank_pattern), "fan_in_fan_out": False}


def _from_peft(raw: dict[str, Any]) -> dict[str, Any]:
    refuse_unknown_peft_fields("HiRA", raw, _PEFT_FIELDS)
    init = raw.get("init_weights", True)
    return {"r": raw.get("r", 8), "dropout": raw.get("hira_dropout", 0.0),
            "rank_pattern": raw.get("rank_pattern") or {},
            "init": "random" if init is False else "gaussian" if init == "gaussian" else "default"}


PEFT = PeftFormat("HIRA", _to_peft, _from_peft, lambda raw: True)
PAPER = ("HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models (Huang et al., 2025) "
         "https://openreview.net/forum?id=TwJrTz9cRS")
register_method("hira", config=HiraConfig, family="low-rank", paper=PAPER, peft=PEFT)(HiraDelta)
