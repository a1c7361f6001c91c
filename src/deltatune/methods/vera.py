"""VeRA: "VeRA: Vector-based Random Matrix Adaptation", Kopiczko et al., 2023, https://arxiv.org/abs/2310.11454

Update rule (matrix view, W of shape out × in):  W' = W + Λ_b·B·Λ_d·A,  Λ_b = diag(b), Λ_d = diag(d).
A (r × in_max) and B (out_max × r) are frozen random matrices shared by every adapted layer: one pair per adapter,
sized for the largest layer and sliced per layer (A[:, :in], B[:out, :]). They are Kaiming-uniform draws from a
generator seeded with `projection_prng_key` (A first, then B), so the seed alone regenerates them; like PEFT they
are also written to the adapter file unless `save_projection=False`.
Init: b = 0 and d = d_initial, so the model is unchanged at step 0. Trainable per layer: b (out,) and d (r,).
Saved with PEFT's names: `<module>.vera_lambda_b`, `<module>.vera_lambda_d`, and the adapter-wide `vera_A`, `vera_B`.

This module also holds what the shared-basis family (VeRA, VB-LoRA, RandLoRA, NOLA) has in common on top of
`factored.FactoredDelta` (ΔW = up·down in the matrix view, which gives forward, merge and a gathered mixed-batch
kernel): `SharedBasesDelta`, adapter-wide tensors saved under PEFT's names, and `peft_format`, an allowlist mapping
of PEFT config fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import (FactoredDelta, RankConfig, down_project, gather_rows, is_empty, refuse_unknown_peft_fields,
                       rows_per_channel)


# ---- shared by the family ---------------------------------------------------------------------------------------
def largest_dims(hosts: dict[str, HostInfo]) -> tuple[int, int]:
    """(largest out_features, largest fan_in) over the adapted layers: the size of adapter-wide bases."""
    return max(i.out_features for i in hosts.values()), max(i.fan_in for i in hosts.values())


class SharedBasesDelta(FactoredDelta):
    """A factored delta with an adapter-wide module `shared_module(config, hosts)` whose tensors `shared_keys` are
    written under PEFT's names, unless the module says `save_projection = False` (then the seed regenerates them)."""

    shared_module: ClassVar[type[nn.Module]]
    shared_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def make_shared(cls, config: DeltaConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        return cls.shared_module(config, hosts)

    @classmethod
    def shared_state_tensors(cls, shared: nn.Module) -> dict[str, Tensor]:
        if not getattr(shared, "save_projection", True):
            return {}
        return {key: getattr(shared, key).detach() for key in cls.shared_keys}

    @classmethod
    def load_shared_state_tensors(cls, shared: nn.Module, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for key, value in tensors.items():
                getattr(shared, key).copy_(value)


def peft_format(peft_type: str, renamed: dict[str, str], *, required: dict[str, Any], ignored: tuple[str, ...] = (),
                written: dict[str, Any] | None = None) -> PeftFormat:
    """PEFT mapping as an allowlist: `renamed` PEFT field -> our field; `required` PEFT field -> the only value we
    reproduce (written, and checked on load); `ignored` fields only matter when PEFT creates an adapter; `written`
    are extra constants for PEFT's benefit. Any other PEFT field that is set is refused by name."""

    def to_peft(config) -> dict:
        return {**(written or {}), **required, **{peft: getattr(config, ours) for peft, ours in renamed.items()}}

    def from_peft(raw: dict) -> dict:
        for key, value in raw.items():
            if key in required and value != required[key] and not is_empty(value):
                raise DeltatuneError(f"PEFT {peft_type} field {key}={value!r} is not supported; deltatune "
                                     f"reproduces only {key}={required[key]!r}")
        refuse_unknown_peft_fields(peft_type, raw, {*renamed, *required, *ignored})
        return {ours: raw[peft] for peft, ours in renamed.items() if peft in raw}

    return PeftFormat(peft_type, to_peft, from_peft, lambda raw: True)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectionConfig(RankConfig):
    """Fields of the methods whose frozen random bases PEFT saves or regenerates from a key (VeRA, RandLoRA).

    Attributes (besides r, the rank of the shared random bases, and dropout):
        projection_prng_key: seed of the generator that draws the bases (PEFT's name).
        save_projection: write the bases into the adapter file (as PEFT does by default) instead of relying on the
            seed alone.
    """

    projection_prng_key: int = 0
    save_projection: bool = True

    def validate(self) -> None:
        super().validate()
        if self.projection_prng_key < 0:
            raise DeltatuneError(f"{self.method}: projection_prng_key must be >= 0, got {self.projection_prng_key}")


# ---- VeRA -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(ProjectionConfig):
    """Attributes (besides projection_prng_key, save_projection, dropout):
    r: rank of the shared random projections A (r × in) and B (out × r); VeRA uses larger r than LoRA.
    d_initial: initial value of every entry of the scaling vector d (b starts at zero).
    """

    r: int = 256
    d_initial: float = 0.1


class VeraProjections(nn.Module):
    """The adapter-wide frozen A (r, in_max) and B (out_max, r), drawn like PEFT: Kaiming-uniform (gain √2)."""

    def __init__(self, config: VeraConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        out_max, in_max = largest_dims(hosts)
        g = seeded(config.projection_prng_key)
        a = nn.init.kaiming_uniform_(torch.empty(config.r, in_max), generator=g)
        b = nn.init.kaiming_uniform_(torch.empty(out_max, config.r), generator=g)
        self.save_projection = config.save_projection
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class VeraDelta(SharedBasesDelta):
    """y = base(x) + b ⊙ B(d ⊙ A(x)) with the shared A, B sliced to this layer."""

    shared_module = VeraProjections
    shared_keys = ("vera_A", "vera_B")

    def __init__(self, config: VeraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.dropout = config.dropout
        self.vera_lambda_b = nn.Parameter(torch.zeros(info.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))

    def projections(self) -> tuple[Tensor, Tensor]:
        """This layer's slices of the shared A (r, fan_in) and B (out, r)."""
        return self.shared.vera_A[:, : self.info.fan_in], self.shared.vera_B[: self.info.out_features]

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        a, b = self.projections()
        return self.vera_lambda_d.unsqueeze(1) * a, self.vera_lambda_b.unsqueeze(1) * b

    @classmethod
    def num_parameters(cls, config: VeraConfig, info: HostInfo, path: str) -> int:
        return info.out_features + config.r

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        """Every row shares A and B, so: one A·x for the batch, d gathered per row, one B·h, b gathered per row."""
        a, b = deltas[0].projections()
        same = all(torch.equal(d.projections()[0], a) and torch.equal(d.projections()[1], b) for d in deltas[1:])
        if not same or host.info.kind in CONV_KINDS or not cls.gatherable(deltas, host):
            return super().per_row(deltas, slots, x, y, host, cache)
        d_rows = gather_rows([d.vera_lambda_d for d in deltas], slots)
        b_rows = gather_rows([d.vera_lambda_b for d in deltas], slots)
        h = down_project(x, a, host)  # (batch, ..., r)
        out = F.linear(h * rows_per_channel(host.info, d_rows, h.ndim), b)
        return y + (out * rows_per_channel(host.info, b_rows, out.ndim)).to(y.dtype)


PAPER = "VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2023) https://arxiv.org/abs/2310.11454"
VERA_PEFT = peft_format(
    "VERA",
    {"r": "r", "d_initial": "d_initial", "projection_prng_key": "projection_prng_key",
     "save_projection": "save_projection", "vera_dropout": "dropout"},
    required={"bias": "none"},
    ignored=("fan_in_fan_out", "init_weights"),
    written={"fan_in_fan_out": False, "init_weights": True},
)
register_method("vera", config=VeraConfig, family="low-rank", paper=PAPER, peft=VERA_PEFT)(VeraDelta)
