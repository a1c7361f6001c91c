"""MoS: "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards", Wang et al., 2024
(ICLR 2025), https://arxiv.org/abs/2410.00938

Update rule (matrix view):  W' = W + s·B·A,  s = alpha / r, where A (r, in) and B (out, r) are not parameters but are
assembled from *shards* — short vectors kept in pools shared by all layers of one kind (same module name and shape,
e.g. every `q_proj`). With l shards per vector (vector sharding), row i of A is the concatenation of shards
idx_A[i·l], ..., idx_A[i·l + l − 1] (cut to `in` entries when l does not divide it), and likewise column i of B.
The four differentiation strategies of the paper, as they act at inference:
- subset selection: each layer takes its own random subset of the pool (indices drawn without replacement);
- pair dissociation: A's and B's subsets are drawn independently, so shard pairs are not tied across layers;
- vector sharding: l shards of length ⌈dim / l⌉ per rank vector;
- shard privatization: the last p rank vectors of each layer use shards only that layer owns. They are kept on the
  delta itself (the authors keep them in the pool, at indices no other layer draws — the same thing).
The "MoE-like router" is this fixed index per layer (the authors' code draws it once with randperm, untrained).
Sizes (the authors' `valid_param_lora_r` = e, `valid_param_private_r` = p, `num_chunk_per_vec` = l): the shared pool
of a group of L layers holds (e − p)·L·l shards per factor, so a group trains exactly as many parameters as LoRA of
rank e: e·l·(⌈in/l⌉ + ⌈out/l⌉) per layer, while each layer computes with rank r (typically r > e).
Init: A-shards Kaiming-uniform over the full row (bound 1/√in, as the authors' code), B-shards 0: identity at init.
On disk: the pools as adapter-wide tensors (`deltatune_shared.pools.<group>_A/_B`); per layer its private shards and
its shard indices (saved, so an adapter never depends on how the random draw is replayed).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import FactoredDelta, ScaledRankConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    equivalent_rank: e, the LoRA rank whose parameter count the pools match (pool: (e − p)·L·l shards per factor).
    private_rank: p, rank vectors per layer built from the layer's own shards (shard privatization); p ≤ min(r, e).
    shards_per_vector: l, shards concatenated into one rank vector (vector sharding).
    seed: seed of the shard selection (subset selection and pair dissociation).
    """

    equivalent_rank: int = 2
    private_rank: int = 1
    shards_per_vector: int = 2
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.equivalent_rank <= 0 or self.shards_per_vector <= 0:
            raise DeltatuneError(
                f"{self.method}: equivalent_rank and shards_per_vector must be > 0, got {self.equivalent_rank} and "
                f"{self.shards_per_vector}"
            )
        if not 0 <= self.private_rank <= min(self.r, self.equivalent_rank):
            raise DeltatuneError(
                f"{self.method}: private_rank must be in [0, min(r, equivalent_rank)] = "
                f"[0, {min(self.r, self.equivalent_rank)}], got {self.private_rank}"
            )


def shard_length(features: int, shards: int) -> int:
    return math.ceil(features / shards)


def group_key(path: str, info: HostInfo) -> str:
    """Layers sharing one pool: same module name (q_proj, c_attn, ...) and same shape."""
    return f"{path.rsplit('.', 1)[-1]}_{info.out_features}x{info.fan_in}"


def init_a_shards(shards: Tensor, fan_in: int) -> None:
    """Kaiming-uniform (a = √5) counted over a whole row of A (fan_in), as the authors' code."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        shards.uniform_(-bound, bound)


class ShardPools(nn.Module):
    """The global pools: per group, A-shards (n, ⌈in/l⌉) and B-shards (n, ⌈out/l⌉), n = (e − p)·L·l, and each
    member layer's route (shard indices into its group's pools), drawn once from the seed."""

    def __init__(self, config: MosConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        groups: dict[str, list[str]] = {}
        for path, info in hosts.items():
            groups.setdefault(group_key(path, info), []).append(path)
        l, shared_rank = config.shards_per_vector, config.equivalent_rank - config.private_rank
        drawn = (config.r - config.private_rank) * l
        generator = torch.Generator().manual_seed(config.seed)
        self.pools = nn.ParameterDict()
        self.routes: dict[str, tuple[Tensor, Tensor]] = {}
        for key, paths in groups.items():
            info, size = hosts[paths[0]], shared_rank * len(paths) * l
            if drawn > size:
                raise DeltatuneError(
                    f"mos: layers {key!r} ({len(paths)} of them) share a pool of {size} shards but each draws {drawn} "
                    f"((r − private_rank)·shards_per_vector); raise equivalent_rank or lower r (need "
                    f"r − p ≤ (e − p)·{len(paths)})"
                )
            self.pools[f"{key}_A"] = nn.Parameter(torch.empty(size, shard_length(info.fan_in, l)))
            init_a_shards(self.pools[f"{key}_A"], info.fan_in)
            self.pools[f"{key}_B"] = nn.Parameter(torch.zeros(size, shard_length(info.out_features, l)))
            for path in paths:  # pair dissociation: A's and B's subsets are drawn independently
                self.routes[path] = (torch.randperm(size, generator=generator)[:drawn],
                                     torch.randperm(size, generator=generator)[:drawn])


class MosDelta(FactoredDelta):
    """y = base(x) + s·B·A·x with A, B concatenated from shared and private shards."""

    def __init__(self, config: MosConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config)
        self.group = group_key(path, info)
        l, private = config.shards_per_vector, config.private_rank * config.shards_per_vector
        drawn = (config.r - config.private_rank) * l
        self.register_buffer("shard_index_A", torch.zeros(drawn, dtype=torch.long))
        self.register_buffer("shard_index_B", torch.zeros(drawn, dtype=torch.long))
        self.private_A = nn.Parameter(torch.empty(private, shard_length(info.fan_in, l)))
        init_a_shards(self.private_A, info.fan_in)
        self.private_B = nn.Parameter(torch.zeros(private, shard_length(info.out_features, l)))

    @classmethod
    def make_shared(cls, config: MosConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        return ShardPools(config, hosts)

    def setup(self, host: Host) -> None:
        index_a, index_b = self.shared.routes[self.path]
        self.shard_index_A.copy_(index_a)
        self.shard_index_B.copy_(index_b)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        pools = self.shared.pools
        a_shards = torch.cat([pools[f"{self.group}_A"][self.shard_index_A], self.private_A])  # (r·l, ⌈in/l⌉)
        b_shards = torch.cat([pools[f"{self.group}_B"][self.shard_index_B], self.private_B])  # (r·l, ⌈out/l⌉)
        down = a_shards.reshape(self.r, -1)[:, : self.info.fan_in]
        up = b_shards.reshape(self.r, -1)[:, : self.info.out_features].t()
        return down, up * self.scaling

    @classmethod
    def num_parameters(cls, config: MosConfig, info: HostInfo, path: str) -> int:
        """LoRA of rank e on ⌈·/l⌉-padded shard vectors: the shared pool is split evenly over its L layers."""
        l = config.shards_per_vector
        return config.equivalent_rank * l * (shard_length(info.fan_in, l) + shard_length(info.out_features, l))


PAPER = ("MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards (Wang et al., 2024) "
         "https://arxiv.org/abs/2410.00938")
register_method("mos", config=MosConfig, family="low-rank", paper=PAPER)(MosDelta)
