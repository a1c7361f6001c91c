"""PMSS: "PMSS: Pretrained Matrices Skeleton Selection for LLM Fine-tuning", Wang et al., 2024,
https://arxiv.org/abs/2409.16722

The paper selects a *skeleton* of the pretrained weight — some of its columns and rows — keeps it frozen and learns
only a small matrix between them; with r skeleton columns and rows that is a CUR (pseudoskeleton) form
W ≈ C·U·R, C = W[:, J] (out, r), R = W[I, :] (r, in), U (r, r), so an update of rank r costs r² parameters.
Update rule (matrix view):  W' = W + C·(U − U₀)·R,  i.e. the base re-expressed as (W − C·U₀·R) + C·U·R with U
trained from U₀. No extra scaling.
Init: U = U₀ = C⁺·W·R⁺, the least-squares best core for the chosen skeleton (the weight-informed start that the paper
motivates against LoRA's), so the model is unchanged at step 0 and U starts where it already explains W.
Selection rule (the abstract does not state it; this module's choice): the r columns J by QR with column pivoting
of W (Businger–Golub greedy: take the column of largest norm orthogonal to those already taken), the r rows I the
same way on Wᵀ — the classical rank-revealing choice of skeletons.
On disk: U and the chosen indices I, J. C, R and U₀ are rebuilt from the base weight at attach / load, so a saved
adapter needs the same base model and never depends on ties being broken the same way on another device.
Hosts: Linear, Conv1D, Embedding and Conv (the skeleton is taken of the matrix view).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, RankConfig, working_matrix


@dataclasses.dataclass(frozen=True, kw_only=True)
class PmssConfig(RankConfig):
    """Attributes:
    r: number of skeleton columns and rows; the trainable core U is r × r (rank of the update ≤ r).
    dropout: dropout probability on the input of the adapter branch.
    """

    r: int = 16


def pivoted_columns(matrix: Tensor, count: int) -> Tensor:
    """Indices of `count` columns picked by QR with column pivoting: each step takes the column of largest residual
    norm, then projects it out of all columns."""
    residual = matrix.clone()
    chosen: list[int] = []
    for _ in range(count):
        norms = residual.pow(2).sum(dim=0)
        norms[chosen] = -1.0
        pick = int(norms.argmax())
        direction = residual[:, pick] / residual[:, pick].norm().clamp_min(torch.finfo(matrix.dtype).tiny)
        residual -= torch.outer(direction, direction @ residual)
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.long, device=matrix.device)


class PmssDelta(FactoredDelta):
    """y = base(x) + C·(U − U₀)·R·x with the skeleton C, R frozen from the base weight."""

    def __init__(self, config: PmssConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config, min(info.out_features, info.fan_in))
        self.register_buffer("column_index", torch.zeros(self.r, dtype=torch.long))
        self.register_buffer("row_index", torch.zeros(self.r, dtype=torch.long))
        # Frozen and rebuilt from the base weight (build_skeleton), never saved.
        self.register_buffer("skeleton_C", torch.zeros(info.out_features, self.r), persistent=False)
        self.register_buffer("skeleton_R", torch.zeros(self.r, info.fan_in), persistent=False)
        self.register_buffer("core_init", torch.zeros(self.r, self.r), persistent=False)
        self.core = nn.Parameter(torch.zeros(self.r, self.r))

    def setup(self, host: Host) -> None:
        weight = working_matrix(host, self.core.dtype)
        self.column_index.copy_(pivoted_columns(weight, self.r))
        self.row_index.copy_(pivoted_columns(weight.t(), self.r))
        self.build_skeleton(weight)
        self.core.copy_(self.core_init)

    def build_skeleton(self, weight: Tensor) -> None:
        """C, R from the chosen indices and U₀ = C⁺·W·R⁺."""
        columns, rows = weight[:, self.column_index], weight[self.row_index]
        self.skeleton_C.copy_(columns)
        self.skeleton_R.copy_(rows)
        self.core_init.copy_(torch.linalg.pinv(columns) @ weight @ torch.linalg.pinv(rows))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return (self.core - self.core_init) @ self.skeleton_R, self.skeleton_C

    @classmethod
    def num_parameters(cls, config: PmssConfig, info: HostInfo, path: str) -> int:
        return config.r**2

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        super().load_state_tensors(tensors, host)
        with torch.no_grad():
            self.build_skeleton(working_matrix(host, self.core.dtype))


PAPER = ("PMSS: Pretrained Matrices Skeleton Selection for LLM Fine-tuning (Wang et al., 2024) "
         "https://arxiv.org/abs/2409.16722")
register_method("pmss", config=PmssConfig, family="low-rank", paper=PAPER)(PmssDelta)
