"""LoRI: "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation", Zhang et al., 2025,
https://arxiv.org/abs/2504.07448

Update rule (matrix view):  W' = W + s·(B ⊙ M)·A,  s = alpha / r.
A (r, in) is a frozen random projection; B (out, r) trains only where the fixed binary mask M is 1. Only the kept
entries of B are parameters, stored packed (row-major order of M), so a layer trains ⌊(1 − sparsity)·out·r⌉
parameters (paper: sparsity 0.9, "up to 95% fewer trainable parameters than LoRA").
Init: A as LoRA's default A (Kaiming-uniform, a = √5: U(−1/√in, 1/√in)), drawn from a generator seeded by (seed,
module path), then frozen; B's kept entries 0, so the model is unchanged at step 0.
A is not saved: it is regenerated from the seed. Give every task its own seed: LoRI's low interference when adapters
are merged rests on the tasks' random A being nearly orthogonal.

The mask. The paper calibrates it: train LoRI-D (dense B, sparsity=0), keep the largest-magnitude entries of B
(ranked across all layers and projections), then train LoRI-S with that mask. Here:
- default (calibration-free): M keeps a uniformly random subset of each layer's entries, drawn from the same seeded
  generator, with exactly the layer's share of entries;
- `calibrate_masks(model, name, dense)` gives adapter `name` the paper's magnitude mask taken from a trained dense
  adapter `dense` — ranked within each layer rather than across the model, because the number of trainable entries
  per layer is fixed by the config (it is what the file layout and the parameter count follow).
The mask is saved with the adapter (`lora_B_mask`, bool), so a calibrated mask survives save / load.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host, slots_of
from .factored import FactoredDelta, ScaledRankConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoriConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    sparsity: fraction of B's entries held at zero (paper: 0.9); 0 is LoRI-D, a dense B.
    seed: seed of the frozen random A and of the default mask; use a different seed per task.
    """

    sparsity: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.sparsity < 1.0:
            raise DeltatuneError(f"{self.method}: sparsity must be in [0, 1), got {self.sparsity} (paper: 0.9)")


def kept_entries(sparsity: float, total: int) -> int:
    """Entries of B that train: (1 − sparsity)·total rounded half up, at least one."""
    return max(1, math.floor((1.0 - sparsity) * total + 0.5))


def layer_generator(seed: int, path: str) -> torch.Generator:
    """A CPU generator per (seed, module path): the same draws on every machine and device."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(path.encode())) % 2**63)


class LoriDelta(FactoredDelta):
    """y = base(x) + s·(B ⊙ M)·A·x with A frozen and random, B sparse."""

    def __init__(self, config: LoriConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config)
        generator = layer_generator(config.seed, path)
        bound = 1.0 / math.sqrt(info.fan_in)
        projection = (torch.rand(self.r, info.fan_in, generator=generator) * 2 - 1) * bound
        self.register_buffer("lora_A", projection, persistent=False)
        total = info.out_features * self.r
        kept = kept_entries(config.sparsity, total)
        mask = torch.zeros(total, dtype=torch.bool)
        mask[torch.randperm(total, generator=generator)[:kept]] = True
        self.register_buffer("lora_B_mask", mask.view(info.out_features, self.r))
        self.lora_B_values = nn.Parameter(torch.zeros(kept))

    def dense_b(self) -> Tensor:
        """B ⊙ M as a dense (out, r) matrix."""
        return self.lora_B_values.new_zeros(self.lora_B_mask.shape).masked_scatter(self.lora_B_mask,
                                                                                     self.lora_B_values)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.dense_b() * self.scaling

    @classmethod
    def num_parameters(cls, config: LoriConfig, info: HostInfo, path: str) -> int:
        return kept_entries(config.sparsity, info.out_features * config.r)

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        kept = int(tensors["lora_B_mask"].sum())
        if kept != self.lora_B_values.numel():
            raise DeltatuneError(
                f"lori: the saved mask at {self.path!r} keeps {kept} entries but its values hold "
                f"{self.lora_B_values.numel()}; the file is inconsistent — re-save the adapter"
            )
        super().load_state_tensors(tensors, host)


def calibrate_masks(model: nn.Module, name: str, dense: str) -> None:
    """LoRI's mask calibration: give LoRI adapter `name` the masks that keep, in each layer, the largest-magnitude
    entries of B in the trained LoRI-D adapter `dense` (sparsity=0, same r and seed, so the same A), and restart
    `name`'s B from zero (LoRI-S is then trained with these masks)."""
    pairs = [(slot.path, slot[name], slot[dense]) for _, _, slot in slots_of(model) if name in slot and dense in slot]
    if not pairs:
        raise DeltatuneError(f"lori: no layer holds both adapters {name!r} and {dense!r}; attach both first")
    for path, target, source in pairs:
        if not (isinstance(target, LoriDelta) and isinstance(source, LoriDelta)):
            raise DeltatuneError(f"lori: calibrate_masks needs two lori adapters, {path!r} holds other methods")
        if source.config.sparsity != 0 or source.r != target.r or not torch.equal(source.lora_A, target.lora_A):
            raise DeltatuneError(
                f"lori: {dense!r} must be a dense LoRI-D adapter (sparsity=0) with the same r and seed as {name!r} "
                f"(at {path!r}: sparsity={source.config.sparsity}, r={source.r} vs {target.r})"
            )
        magnitude = source.dense_b().detach().abs().flatten()
        mask = torch.zeros_like(magnitude, dtype=torch.bool)
        mask[magnitude.topk(target.lora_B_values.numel()).indices] = True
        with torch.no_grad():
            target.lora_B_mask.copy_(mask.view_as(target.lora_B_mask))
            target.lora_B_values.zero_()


PAPER = ("LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation (Zhang et al., 2025) "
         "https://arxiv.org/abs/2504.07448")
register_method("lori", config=LoriConfig, family="low-rank", paper=PAPER)(LoriDelta)
