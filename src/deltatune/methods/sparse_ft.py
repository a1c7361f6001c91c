"""Sparse fine-tuning (SFT): train a fixed, sparse set of entries of each weight, stored as (indices, values).

- LT-SFT: "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", Ansell et al., 2021,
  https://arxiv.org/abs/2110.07560
- SpIEL: "Scaling Sparse Fine-Tuning to Large Language Models", Ansell et al., 2024, https://arxiv.org/abs/2401.16405
- RoseLoRA: "Row and Column-wise Sparse Low-rank Adaptation of Pre-trained Language Model for Knowledge Editing and
  Fine-tuning", Wang et al., 2024, https://arxiv.org/abs/2406.10777

Update rule (matrix view W of shape out × fan_in, flat index set η of size k):
    ΔW[η_j] = v_j for j = 1..k,  ΔW = 0 elsewhere  —  W' = W + ΔW.
Init: v = 0, so the model is unchanged at step 0.
Shapes: indices η (k,) int64 (row-major positions in the matrix view) and values v (k,), saved as `sparse_indices`
and `sparse_values`; k = `k`, else round(density · out · fan_in) (at least 1).

Selection of η (fixed for the adapter's life):
- "mask": LT-SFT's — the caller gives each module's indices (e.g. the top-k most-changed entries after a first full
  fine-tuning pass, the "lottery ticket"; phase 2 then trains only these).
- "random": SpIEL's initial index set — k distinct positions drawn uniformly from a seeded generator. SpIEL's
  later drop/regrow steps (which change η during training) are not implemented: η stays fixed.
- "magnitude": the k largest |W| entries, a data-free heuristic not taken from these papers.
RoseLoRA's selection (row/column sparsity of low-rank factors by sensitivity) is a low-rank method and is not
covered here.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host
from ..core.targeting import matches


def path_generator(seed: int, path: str) -> torch.Generator:
    """A CPU generator seeded from the adapter seed and the module path, so each layer draws its own subset."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseFtConfig(DeltaConfig):
    """Attributes:
    selection: how the trained entries are chosen: "random" (seeded), "magnitude" (largest |W|) or "mask"
        (given in `indices`).
    density: fraction of each weight's entries that train (random / magnitude).
    k: exact number of entries per layer, overriding density (random / magnitude).
    seed: seed of the random selection.
    indices: for selection="mask": module name (as in targets: exact path or dotted suffix) -> flat row-major
        positions in the (out, fan_in) matrix view of that module's weight.
    """

    selection: Literal["random", "magnitude", "mask"] = "random"
    density: float = 0.01
    k: Optional[int] = None
    seed: int = 0
    indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.density <= 1.0:
            raise DeltatuneError(f"sparse_ft: density must be in (0, 1], got {self.density}")
        if self.k is not None and self.k <= 0:
            raise DeltatuneError(f"sparse_ft: k must be > 0, got {self.k}")
        if self.selection == "mask" and not self.indices:
            raise DeltatuneError("sparse_ft: selection='mask' needs indices={module name: [positions]}")
        if self.selection == "mask" and self.k is not None:
            raise DeltatuneError(f"sparse_ft: k={self.k} has no effect with selection='mask' (the mask sets k); "
                                 "drop k")
        if self.selection != "mask" and self.indices:
            raise DeltatuneError(
                f"sparse_ft: indices are only used with selection='mask', got selection={self.selection!r}")
        for name, positions in self.indices.items():
            if not positions or min(positions) < 0 or len(set(positions)) != len(positions):
                raise DeltatuneError(
                    f"sparse_ft: indices[{name!r}] must be distinct non-negative positions, got {positions}")

    def mask_for(self, path: str) -> list[int]:
        for name, positions in self.indices.items():
            if matches(path, [name]):
                return positions
        raise DeltatuneError(f"sparse_ft: selection='mask' but indices has no entry for module {path!r}; add one")

    def count_for(self, info: HostInfo, path: str) -> int:
        """k for this layer: the mask's size, or k, or round(density · numel) (at least 1)."""
        if self.selection == "mask":
            return len(self.mask_for(path))
        if self.k is not None:
            return self.k
        return max(1, round(self.density * info.out_features * info.fan_in))


class SparseFtDelta(Delta):
    """y = base(x) + host_op(x, ΔW), ΔW = scatter(η, v) in the matrix view."""

    def __init__(self, config: SparseFtConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        numel = info.out_features * info.fan_in
        k = config.count_for(info, path)
        if k > numel:
            raise DeltatuneError(f"sparse_ft: {k} entries requested at {path!r}, whose weight has only {numel}; "
                                 "lower k or density")
        self.sparse_values = nn.Parameter(torch.zeros(k))
        self.register_buffer("sparse_indices", torch.zeros(k, dtype=torch.long))
        if config.selection == "mask":
            positions = torch.tensor(sorted(config.mask_for(path)), dtype=torch.long)
            if positions[-1] >= numel:
                raise DeltatuneError(f"sparse_ft: position {int(positions[-1])} in indices for {path!r} is outside "
                                     f"its {info.out_features}×{info.fan_in} matrix view")
            self.sparse_indices.copy_(positions)
        elif config.selection == "random":
            chosen = torch.randperm(numel, generator=path_generator(config.seed, path))[:k]
            self.sparse_indices.copy_(chosen.sort().values)

    def setup(self, host: Host) -> None:
        if self.config.selection == "magnitude":
            magnitude = to_matrix(self.info, host.weight()).abs().reshape(-1)
            top = torch.topk(magnitude.float(), self.sparse_values.numel()).indices
            self.sparse_indices.copy_(top.sort().values)

    def delta_matrix(self) -> Tensor:
        """ΔW in the matrix view (out, fan_in)."""
        flat = self.sparse_values.new_zeros(self.info.out_features * self.info.fan_in)
        return flat.index_put((self.sparse_indices,), self.sparse_values).view(self.info.out_features, -1)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS or self.sparse_values.numel() > self.info.out_features:
            # Embeddings, convolutions, and dense-ish masks (the gather below would outgrow the output):
            # the host's own op with the dense ΔW.
            return super().forward(x, y, host)
        # Only the k touched entries: y[..., row_j] += v_j · x[..., col_j]  (O(tokens · k), no dense ΔW).
        rows = self.sparse_indices // self.info.fan_in
        cols = self.sparse_indices % self.info.fan_in
        contrib = x.index_select(-1, cols).to(self.sparse_values.dtype) * self.sparse_values
        return y.index_add(-1, rows, contrib.to(y.dtype))

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, self.delta_matrix())

    @classmethod
    def num_parameters(cls, config: SparseFtConfig, info: HostInfo, path: str) -> int:
        return config.count_for(info, path)


PAPER = ("Composable Sparse Fine-Tuning for Cross-Lingual Transfer (Ansell et al., 2021) "
         "https://arxiv.org/abs/2110.07560")

register_method("sparse_ft", config=SparseFtConfig, family="selective", paper=PAPER)(SparseFtDelta)
