"""RandLoRA: "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", Albert et al., 2025,
https://arxiv.org/abs/2502.00987

Update rule (matrix view, W of shape out × in, m = min(out, in), M = max(out, in), n = ⌈m / r⌉ bases):
    ΔW_{M×m} = s · Σ_{i=1..n} B_i · Λ_i · A · Γ_i,   s = alpha / r,   ΔW = ΔW_{M×m} or its transpose (when out < in),
with B_i (M × r) and A (r × m) frozen random matrices shared by every adapted layer (A is one matrix shared by all n
terms, the B_i differ) and the diagonals Λ_i = diag(λ_i) (r × r) and Γ_i = diag(γ_i) (m × m) trainable. With n·r ≥ m
the sum reaches full rank, unlike LoRA. The n·r columns of the B_i are paired with the n·r scaled rows of A in
PEFT's layout (B stored as (M, n, r), read column c = i·r + k; scaled A rows read c = k·n + i), a fixed relabelling
of the random B_i kept for file compatibility.
Bases: one adapter-wide A (r, 1, m_max) and B (M_max, n_max, r), sliced per layer; Kaiming-uniform (a = √5) draws in
bfloat16 from a generator seeded with `projection_prng_key`, then divided by their standard deviation (PEFT's rule,
so the seed gives PEFT's bases); `bases="sparse"` / `"very_sparse"` draw ternary {-1, 0, 1} bases instead.
Init: λ = 0 (the model is unchanged at step 0), γ = 1 / m. Trainable per layer: λ (r, n) and γ (n, m).
Saved with PEFT's names: `<module>.randlora_lambda`, `<module>.randlora_gamma`, adapter-wide `randlora_A`,
`randlora_B` (unless `save_projection=False`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import Delta
from ..core.hosts import HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .vera import ProjectionConfig, SharedBasesDelta, largest_dims, peft_format, seeded


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandloraConfig(ProjectionConfig):
    """Attributes (besides projection_prng_key, save_projection, dropout):
    r: rank of each random basis pair; a layer uses n = ⌈min(out, in) / r⌉ of them.
    alpha: scaling numerator (s = alpha / r); PEFT's default is 20·r.
    bases: "dense" (Kaiming-uniform), "sparse" (ternary, P(±1) = 1/6 each) or "very_sparse" (P(±1) = 1/(2√m)).
    """

    r: int = 32
    alpha: float = 640.0
    bases: Literal["dense", "sparse", "very_sparse"] = "dense"


def num_bases(m: int, r: int) -> int:
    """n = ⌈m / r⌉: enough rank-r terms for the sum to reach rank m."""
    return math.ceil(m / r)


def dense_bases(r: int, m: int, big: int, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A (r, 1, m) and n stacked B_i (big, n, r): Kaiming-uniform (a = √5) in bfloat16, scaled to unit std."""
    a = nn.init.kaiming_uniform_(torch.empty(r, 1, m, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
    parts = [nn.init.kaiming_uniform_(torch.empty(big, 1, r, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
             for _ in range(n)]
    b = torch.cat(parts, dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


def ternary_bases(r: int, m: int, big: int, n: int, g: torch.Generator, sparsity: float) -> tuple[Tensor, Tensor]:
    """Sparse random projections: -1 / +1 with probability 1/(2·sparsity) each, else 0; scaled to unit std."""
    out = []
    for shape in ((r, 1, m), (big, n, r)):
        u = torch.rand(shape, generator=g)
        t = torch.zeros(shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        out.append(t)
    return out[0] / out[0].std(), out[1] / out[1].std()


class RandloraBases(nn.Module):
    """The adapter-wide frozen A (r, 1, m_max) and B (M_max, n_max, r)."""

    def __init__(self, config: RandloraConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        out_max, in_max = largest_dims(hosts)
        m, big = min(out_max, in_max), max(out_max, in_max)
        n, g = num_bases(m, config.r), seeded(config.projection_prng_key)
        if config.bases == "dense":
            a, b = dense_bases(config.r, m, big, n, g)
        else:
            a, b = ternary_bases(config.r, m, big, n, g, 3.0 if config.bases == "sparse" else math.sqrt(m))
        self.save_projection = config.save_projection
        self.register_buffer("randlora_A", a, persistent=False)
        self.register_buffer("randlora_B", b, persistent=False)


class RandloraDelta(SharedBasesDelta):
    """y = base(x) + s·Σ_i B_i Λ_i A Γ_i x  (transposed roles when out < in)."""

    # The factors have rank n·r ≈ min(out, in): gathering them per row would copy a full weight per row.
    per_row = classmethod(Delta.per_row.__func__)
    shared_module = RandloraBases
    shared_keys = ("randlora_A", "randlora_B")
    peft_layer_copies = shared_keys  # PEFT also writes the shared bases under every layer

    def __init__(self, config: RandloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.dropout = config.dropout
        self.scaling = config.alpha / config.r
        self.m = min(info.out_features, info.fan_in)
        self.n = num_bases(self.m, config.r)
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.n))
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.m), 1.0 / self.m))

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        r, n, m, big = self.config.r, self.n, self.m, max(self.info.out_features, self.info.fan_in)
        a = self.shared.randlora_A[:, 0, :m]  # (r, m), shared by every term
        scaled_a = self.randlora_lambda.unsqueeze(2) * a.unsqueeze(1) * self.randlora_gamma.unsqueeze(0)  # (r, n, m)
        stacked_a = scaled_a.reshape(r * n, m)
        stacked_b = self.shared.randlora_B[:big, :n, :].reshape(big, n * r)
        if self.info.fan_in == m:
            return stacked_a, self.scaling * stacked_b
        return stacked_b.t(), self.scaling * stacked_a.t()

    @classmethod
    def num_parameters(cls, config: RandloraConfig, info: HostInfo, path: str) -> int:
        m = min(info.out_features, info.fan_in)
        n = num_bases(m, config.r)
        return n * config.r + n * m


def _bases_from_peft(raw: dict) -> dict:
    """PEFT's two flags -> `bases` (very_sparse wins when both are set, as in PEFT)."""
    return {"bases": "very_sparse" if raw.get("very_sparse") else "sparse" if raw.get("sparse") else "dense"}


def _randlora_peft() -> PeftFormat:
    base = peft_format(
        "RANDLORA",
        {"r": "r", "randlora_alpha": "alpha", "projection_prng_key": "projection_prng_key",
         "save_projection": "save_projection", "randlora_dropout": "dropout"},
        required={"bias": "none"},
        ignored=("fan_in_fan_out", "init_weights", "sparse", "very_sparse"),
        written={"fan_in_fan_out": False, "init_weights": True},
    )

    def to_peft(config: RandloraConfig) -> dict:
        flags = {"sparse": config.bases == "sparse", "very_sparse": config.bases == "very_sparse"}
        return {**base.to_peft(config), **flags}

    def from_peft(raw: dict) -> dict:
        return {**base.from_peft(raw), **_bases_from_peft(raw)}

    return dataclasses.replace(base, to_peft=to_peft, from_peft=from_peft)


PAPER = ("RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., 2025) "
         "https://arxiv.org/abs/2502.00987")
register_method("randlora", config=RandloraConfig, family="low-rank", paper=PAPER,
                peft=_randlora_peft())(RandloraDelta)
