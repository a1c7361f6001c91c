"""NOLA: "NOLA: Compressing LoRA using Linear Combination of Random Basis", Koohpayegani et al., 2023,
https://arxiv.org/abs/2310.02556

Update rule (matrix view, W of shape out × in):  W' = W + s·B·A,  s = alpha / r,
    A = Σ_{i=1..k} α_i A_i  (r × in),   B = Σ_{j=1..l} β_j B_j  (out × r),
with the bases A_i, B_j frozen and random and only the coefficients α (k,) and β (l,) trained, so the trainable
count per layer is k + l whatever the layer's shape or the rank.
Bases: one adapter-wide set, drawn U(-1, 1) from a generator seeded with `seed` at the largest layer's size and
sliced per layer (A_i[:, :in] / √in, B_j[:out, :] / √r, so each layer sees LoRA's Kaiming-uniform scale). They are
non-persistent buffers: the adapter file holds only the coefficients, and loading regenerates the bases from the seed.
They take k·r·in_max + l·out_max·r floats of memory (the paper also offers regenerating them on the fly instead).
Init: β = 0 (the model is unchanged at step 0, as LoRA's B = 0) and α ~ N(0, 1/k), which gives A LoRA's init
variance 1/(3·in).
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
from .factored import ScaledRankConfig, check_positive
from .vera import SharedBasesDelta, largest_dims, seeded


@dataclasses.dataclass(frozen=True, kw_only=True)
class NolaConfig(ScaledRankConfig):
    """Attributes (besides r, the rank of A and B, alpha, s = alpha / r, and dropout on the NOLA branch's input):
    num_bases_a: k, the number of random bases A_i that A mixes.
    num_bases_b: l, the number of random bases B_j that B mixes.
    seed: seed of the generator that draws the bases (the only thing needed to rebuild them).
    """

    alpha: float = 8.0
    num_bases_a: int = 1024
    num_bases_b: int = 1024
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_positive(self.method, num_bases_a=self.num_bases_a, num_bases_b=self.num_bases_b)
        if self.seed < 0:
            raise DeltatuneError(f"{self.method}: seed must be >= 0, got {self.seed}")


class NolaBases(nn.Module):
    """The adapter-wide frozen bases: A_i stacked (k, r, in_max) and B_j stacked (l, out_max, r), U(-1, 1)."""

    def __init__(self, config: NolaConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        out_max, in_max = largest_dims(hosts)
        g = seeded(config.seed)
        a = torch.empty(config.num_bases_a, config.r, in_max).uniform_(-1.0, 1.0, generator=g)
        b = torch.empty(config.num_bases_b, out_max, config.r).uniform_(-1.0, 1.0, generator=g)
        self.register_buffer("bases_A", a, persistent=False)
        self.register_buffer("bases_B", b, persistent=False)


class NolaDelta(SharedBasesDelta):
    """y = base(x) + s·(Σ β_j B_j)(Σ α_i A_i)x."""

    shared_module = NolaBases  # no shared_keys: the bases are never saved

    def __init__(self, config: NolaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.dropout = config.dropout
        self.scaling = config.alpha / config.r
        self.nola_alpha = nn.Parameter(torch.randn(config.num_bases_a) / math.sqrt(config.num_bases_a))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_bases_b))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        fan_in, out, r = self.info.fan_in, self.info.out_features, self.config.r
        a = torch.einsum("i,irn->rn", self.nola_alpha, self.shared.bases_A[:, :, :fan_in]) / math.sqrt(fan_in)
        b = torch.einsum("j,jor->or", self.nola_beta, self.shared.bases_B[:, :out, :]) / math.sqrt(r)
        return a, self.scaling * b

    @classmethod
    def num_parameters(cls, config: NolaConfig, info: HostInfo, path: str) -> int:
        return config.num_bases_a + config.num_bases_b


PAPER = ("NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., 2023) "
         "https://arxiv.org/abs/2310.02556")
register_method("nola", config=NolaConfig, family="low-rank", paper=PAPER)(NolaDelta)
