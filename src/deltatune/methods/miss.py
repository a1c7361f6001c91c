"""MiSS (Matrix Shard Sharing), formerly Bone: "Bone: Block-Affine Adaptation of Large Language Models" /
"MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing", Kang, 2024,
https://arxiv.org/abs/2409.15371 (PEFT's `MISS`; PEFT no longer reads the old `BONE` type, so only `miss` is
registered).

Update rule (matrix view, out × fan_in), default "miss":  ΔW[o, j] = D[j mod r, o], i.e. ΔW = [Dᵀ Dᵀ … Dᵀ]
(the shard Dᵀ repeated across the input, the last copy cut to fan_in), so ΔW·x = Dᵀ·(Σ_k x_k) with x split
into r-long shards (zero-padded) — one (r × out) matmul, no ΔW.
"mini": D (r, mini_r) is repeated along the output too (out must be a multiple of mini_r).
"bat" (Bone's block-affine rule): with W cut into r×r blocks W_ij (i over out/r, j over fan_in/r) and
D (out/r, r, r), ΔW_ij = W_ij·D_i + D_i — the update depends on the base weight.
Init: D = 0 (identity at init); "random" makes D (r, out) Kaiming-uniform. `dropout` drops x before the
shard sum.
Parameters: `miss_block` D — (r, out) for miss/random, (out/r, r, r) for bat, (r, mini_r) for mini.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, WEIGHT_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import add_dense, gather_rows, kaiming_, refuse_unknown_peft_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class MissConfig(DeltaConfig):
    """Attributes:
    r: shard length (the rows of D); at most fan_in.
    dropout: dropout probability on the input of the shard sum (not used by "bat").
    init: "miss" (D = 0), "bat" (Bone's block-affine form, D = 0), "mini" (D (r, mini_r) = 0) or "random"
        (D (r, out) Kaiming-uniform; tests).
    mini_r: output period of D with init "mini".
    """

    r: int = 64
    dropout: float = 0.0
    init: Literal["miss", "bat", "mini", "random"] = "miss"
    mini_r: int = 1

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.mini_r <= 0:
            raise DeltatuneError(f"miss: r and mini_r must be > 0, got r={self.r}, mini_r={self.mini_r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltatuneError(f"miss: dropout must be in [0, 1), got {self.dropout}")


def block_shape(config: MissConfig, info: HostInfo, path: str) -> tuple[int, ...]:
    """Shape of D at `path`, after checking that the layer can be cut as the init needs."""
    r, out = config.r, info.out_features
    if r > info.fan_in:
        raise DeltatuneError(f"miss: r={r} exceeds the {info.fan_in} inputs of {path!r}; lower r")
    if config.init == "bat":
        if out % r or info.fan_in % r:
            raise DeltatuneError(f"miss: init='bat' needs r={r} to divide both sides of {path!r} "
                                 f"({out}×{info.fan_in}); pick a common divisor")
        return out // r, r, r
    if config.init == "mini":
        if out % config.mini_r:
            raise DeltatuneError(f"miss: mini_r={config.mini_r} must divide out_features={out} of {path!r}")
        return r, config.mini_r
    return r, out


class MissDelta(Delta):
    """y = base(x) + ΔW·x with ΔW built from the shard D (see the module docstring)."""

    def __init__(self, config: MissConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.r = config.r
        self.mode = config.init
        self.uses_base_weight = config.init == "bat"  # per instance: only the block-affine form reads W
        self.dropout = config.dropout
        self.miss_block = nn.Parameter(torch.zeros(block_shape(config, info, path)))
        if config.init == "random":
            with torch.no_grad():
                kaiming_(self.miss_block)

    def shard(self) -> Tensor:
        """D as (r, out): the mini form repeated along the output."""
        if self.mode == "mini":
            return self.miss_block.repeat(1, self.info.out_features // self.miss_block.shape[1])
        return self.miss_block

    def matrix(self, host: Host) -> Tensor:
        """ΔW in the matrix view (out, fan_in)."""
        out, fan_in, r = self.info.out_features, self.info.fan_in, self.r
        if self.mode != "bat":
            return self.shard().t().repeat(1, -(-fan_in // r))[:, :fan_in]
        weight = to_matrix(self.info, host.weight()).to(self.miss_block.dtype)
        blocks = weight.reshape(out // r, r, fan_in // r, r).permute(0, 2, 1, 3)  # (i, j, r, r) = W_ij
        update = blocks @ self.miss_block.unsqueeze(1) + self.miss_block.unsqueeze(1)
        return update.permute(0, 2, 1, 3).reshape(out, fan_in)

    def shard_sums(self, x: Tensor) -> Tensor:
        """Σ_k x_k over r-long shards of the (dropped-out, zero-padded) input: (..., r)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        x = F.pad(x, (0, -x.shape[-1] % self.r))
        return x.reshape(*x.shape[:-1], -1, self.r).sum(-2)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.mode == "bat" or self.info.kind not in LINEAR_KINDS:
            return add_dense(x, y, host, self.delta_weight(host))
        shard = self.shard()
        return y + (self.shard_sums(x.to(shard.dtype)) @ shard).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.matrix(host))

    @classmethod
    def identity_for(cls, config: MissConfig) -> bool:
        return config.init != "random"

    @classmethod
    def num_parameters(cls, config: MissConfig, info: HostInfo, path: str) -> int:
        return math.prod(block_shape(config, info, path))

    # ---- mixed batches: each row's shard gathered, one bmm -------------------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        r = deltas[0].r
        if host.info.kind not in LINEAR_KINDS or any(
            d.mode == "bat" or d.r != r or (d.training and d.dropout) for d in deltas
        ):
            return super().per_row(deltas, slots, x, y, host, cache)
        rows = gather_rows([d.shard() for d in deltas], slots)  # (batch, r, out)
        sums = deltas[0].shard_sums(x.to(rows.dtype))  # (batch, ..., r): the same for all, as they share r
        update = torch.bmm(sums.reshape(x.shape[0], -1, r), rows)
        return y + update.reshape(y.shape).to(y.dtype)


def _to_peft(config: MissConfig) -> dict:
    init = {"miss": True, "random": False}.get(config.init, config.init)
    return {"r": config.r, "miss_dropout": config.dropout, "init_weights": init, "mini_r": config.mini_r,
            "bias": "none"}


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("MISS", raw, ("r", "miss_dropout", "init_weights", "mini_r", "bias"))
    if raw.get("bias", "none") != "none":
        raise DeltatuneError(f"PEFT MISS bias={raw['bias']!r} is not supported; deltatune supports 'none'")
    init = raw.get("init_weights", True)
    return {"r": raw.get("r", 64), "dropout": raw.get("miss_dropout", 0.0), "mini_r": raw.get("mini_r", 1),
            "init": "miss" if init is True else "random" if init is False else init}


PAPER = "Bone: Block-Affine Adaptation of Large Language Models (Kang, 2024) https://arxiv.org/abs/2409.15371"
register_method("miss", config=MissConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS,
                peft=PeftFormat("MISS", _to_peft, _from_peft, lambda raw: True))(MissDelta)
