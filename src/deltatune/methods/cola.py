"""COLA: "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning", Xia et al., 2024,
https://arxiv.org/abs/2401.04151

Update rule (matrix view):  W' = W + s·(Σ_{j<k} B_j·A_j + B·A),  s = alpha / r.
Training runs `links` + 1 LoRA phases: at the end of a phase (`after_step`) the current B·A is merged into the
chain — kept as frozen factors beside the base weight, which deltatune never edits — and a fresh LoRA starts
(A Kaiming, B = 0: the output does not change at a restart). Restarts come every `restart_every` steps, or, with 0,
evenly spaced over the run. The total update can reach rank (links + 1)·r at the cost of a rank-r LoRA. The
paper also resets the optimizer state of the new LoRA: `after_step` returns the restarted parameters so that a
trainer can drop their state.
Saved as a plain PEFT LoRA of rank (links + 1)·r: A' = [A; A_1; …], B' = [B, B_1, …] (unused links are zero).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import kaiming_
from .lora import LoraConfig, LoraDelta, lora_shapes
from .lora_peft import lora_peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColaConfig(LoraConfig):
    """LoRA's fields, plus:
    links: how many times training merges and restarts (the chain's length).
    restart_every: optimizer steps between restarts (0: `links` restarts evenly spaced over the run).
    """

    links: int = 2
    restart_every: int = 0

    def validate(self) -> None:
        super().validate()
        if self.links < 1 or self.restart_every < 0:
            raise DeltatuneError(f"cola: links must be >= 1 and restart_every >= 0, got {self.links}, "
                                 f"{self.restart_every}")
        if self.init not in ("default", "gaussian"):
            raise DeltatuneError("cola: init must be 'default' or 'gaussian'")


class ColaDelta(LoraDelta):
    """y = base(x) + s·([B, B_1, …]·[A; A_1; …])·x, the chain frozen."""

    def __init__(self, config: ColaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        a_shape, b_shape = lora_shapes(info, self.r * config.links)
        self.register_buffer("chain_A", torch.zeros(a_shape), persistent=False)
        self.register_buffer("chain_B", torch.zeros(b_shape), persistent=False)
        self.links_used = 0

    def ab(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.lora_A, self.chain_A]), torch.cat([self.lora_B, self.chain_B], dim=1)

    @torch.no_grad()
    def restart(self) -> list[nn.Parameter]:
        """Merge B·A into the next free link and start a fresh LoRA; returns the restarted parameters."""
        if self.links_used >= self.config.links:
            return []
        link = slice(self.links_used * self.r, (self.links_used + 1) * self.r)
        self.chain_A[link] = self.lora_A
        self.chain_B[:, link] = self.lora_B
        kaiming_(self.lora_A)
        self.lora_B.zero_()
        self.links_used += 1
        return [self.lora_A, self.lora_B]

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            for key, value in tensors.items():
                if key in ("lora_A.weight", "lora_embedding_A"):
                    self.lora_A.copy_(value[: self.r])
                    self.chain_A.copy_(value[self.r:])
                elif key in ("lora_B.weight", "lora_embedding_B"):
                    self.lora_B.copy_(value[:, : self.r])
                    self.chain_B.copy_(value[:, self.r:])
                else:
                    super().load_state_tensors({key: value}, host)
        used = self.chain_A.reshape(self.config.links, self.r, -1).abs().sum(dim=(1, 2)) > 0
        self.links_used = int(used.sum())

    @classmethod
    def after_step(cls, deltas: dict[str, ColaDelta], step: int, total_steps: int) -> list[nn.Parameter]:
        config = next(iter(deltas.values())).config
        if config.restart_every:
            due = step % config.restart_every == 0
        else:
            due = step in {round(total_steps * (i + 1) / (config.links + 1)) for i in range(config.links)}
        if not due or step >= total_steps:
            return []
        return [p for delta in deltas.values() for p in delta.restart()]


def _peft_format() -> PeftFormat:
    """PEFT's LoRA of rank (links + 1)·r, alpha scaled to keep s."""
    lora = lora_peft_format(dora=False, claims=False)

    def to_peft(config: ColaConfig) -> dict:
        out = lora.to_peft(config)
        factor = config.links + 1
        out["r"] *= factor
        out["lora_alpha"] *= factor ** 0.5 if config.use_rslora else factor
        out["rank_pattern"] = {k: v * factor for k, v in out["rank_pattern"].items()}
        out["alpha_pattern"] = {k: v * (factor ** 0.5 if config.use_rslora else factor)
                                for k, v in out["alpha_pattern"].items()}
        return out

    return PeftFormat("LORA", to_peft, lora.from_peft, lambda raw: False)


PAPER = ("Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning (Xia et al., 2024) "
         "https://arxiv.org/abs/2401.04151")
register_method("cola", config=ColaConfig, family="rank-allocation", paper=PAPER, peft=_peft_format())(ColaDelta)
