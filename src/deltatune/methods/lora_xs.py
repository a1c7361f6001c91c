"""LoRA-XS, and the factored base its group (MoS, LoRI, PMSS) shares.

"LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters", Bałazy et al., 2024,
https://arxiv.org/abs/2405.17604

Update rule (matrix view, W of shape out × in):  W' = W + s·B·R·A,  s = alpha / r.
B and A come from the truncated SVD of the pretrained weight, W ≈ U_r Σ_r V_rᵀ: B = U_r (out, r) and A = Σ_r V_rᵀ
(r, in) — the authors' code puts the singular values on the input side. Both are frozen; only R (r, r) trains, so
a layer has r² trainable parameters whatever its width.
Init: R ~ N(0, init_std²) with init_std = 1e-5 (the authors' code), so the start is *almost* the base model;
init_std = 0 gives an exact identity start (R still gets a gradient, Bᵀ·G·Aᵀ, because A and B are non-zero).
A and B are not saved: they are recomputed from the base weight at attach / load (`setup`). Singular vectors are
only defined up to sign, so each pair (u_i, v_i) is flipped to make the largest-magnitude entry of u_i positive;
that makes the recomputed factors — and hence the meaning of a saved R — independent of the SVD backend.
Hosts: Linear, Conv1D, Embedding and Conv (the SVD is taken of the matrix view).

`FactoredDelta` below is the shared machinery of this group: a method gives `factors()` = (down (r, in),
up (out, r)) with ΔW = up·down, and gets forward, delta_weight and a gathered mixed-batch kernel.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host


# ---- configs shared by the group --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RankConfig(DeltaConfig):
    """Attributes:
    r: rank of the update (size of the factors' inner dimension).
    dropout: dropout probability on the input of the adapter branch.
    """

    r: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise DeltatuneError(f"{self.method}: r must be > 0, got r={self.r}; pick a positive rank")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltatuneError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledRankConfig(RankConfig):
    """Attributes (besides RankConfig's):
    alpha: scaling numerator, s = alpha / r (as in LoRA).
    """

    alpha: float = 16.0


# ---- the factored base ------------------------------------------------------------------------------------------------
class FactoredDelta(Delta):
    """ΔW = up · down in the matrix view, with every scaling folded into `up`. Subclasses give `factors()`."""

    dropout: float = 0.0

    def take_rank(self, config: RankConfig, limit: int | None = None) -> None:
        """r (checked against `limit`), dropout and the scaling s = alpha / r (1 without alpha) from the config."""
        self.r = config.r
        self.check_rank(self.r, limit)
        self.dropout = config.dropout
        self.scaling = config.alpha / config.r if isinstance(config, ScaledRankConfig) else 1.0

    def factors(self) -> tuple[Tensor, Tensor]:
        """(down (r, fan_in), up (out_features, r)) in the delta's dtype."""
        raise NotImplementedError(f"{type(self).__name__} must give its factors")

    def dropped(self, x: Tensor) -> Tensor:
        if self.dropout and self.training and self.info.kind != "embedding":
            return F.dropout(x, self.dropout, training=True)
        return x

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        down, up = self.factors()
        x = self.dropped(x)
        if self.info.kind in CONV_KINDS:  # kernels are small: one convolution with ΔW
            return y + host.apply(x.to(down.dtype), from_matrix(self.info, up @ down)).to(y.dtype)
        if self.info.kind == "embedding":
            h = host.apply(x, down.t())  # look-up in the (vocab, r) table
        else:
            h = F.linear(x.to(down.dtype), down)
        return y + F.linear(h, up).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        down, up = self.factors()
        return from_matrix(self.info, up @ down)

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        """Gathered: each row's factors are picked from a stack and applied with two batched matmuls."""
        if host.info.kind in CONV_KINDS or any(d.training and d.dropout for d in deltas):
            return super().per_row(deltas, slots, x, y, host, cache)
        downs, ups = stacked_factors(deltas, cache["kernel_cache"])
        idx = torch.where(slots < 0, len(deltas), slots)
        batch, rank = x.shape[0], downs.shape[1]
        if host.info.kind == "embedding":
            table = downs.transpose(1, 2).reshape(-1, rank)  # ((K+1)·vocab, r)
            offsets = (idx * host.info.in_features).view(batch, *([1] * (x.ndim - 1)))
            h = F.embedding(x + offsets, table).reshape(batch, -1, rank)
        else:
            h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(downs.dtype), downs[idx].transpose(1, 2))
        update = torch.bmm(h, ups[idx].transpose(1, 2))
        return y + update.reshape(y.shape).to(y.dtype)


def stacked_factors(deltas: list[FactoredDelta], store: dict) -> tuple[Tensor, Tensor]:
    """(down (K+1, r_max, fan_in), up (K+1, out, r_max)) zero-padded to the largest rank; slot K is all zeros.

    Without gradients the stack is kept until a tensor of any delta (or of its shared module) changes: the key
    holds their version counters, which a load or an optimizer step bumps.
    """
    key = None
    if not torch.is_grad_enabled():
        key = tuple((id(d), *(t._version for t in _tensors_of(d))) for d in deltas)
        if store.get("factored_key") == key:
            return store["factored_stack"]
    factors = [d.factors() for d in deltas]
    r_max = max(down.shape[0] for down, _ in factors)
    downs = [F.pad(down, (0, 0, 0, r_max - down.shape[0])) for down, _ in factors]
    ups = [F.pad(up, (0, r_max - up.shape[1])) for _, up in factors]
    stack = torch.stack(downs + [torch.zeros_like(downs[0])]), torch.stack(ups + [torch.zeros_like(ups[0])])
    if key is not None:
        store["factored_key"], store["factored_stack"] = key, stack
    return stack


def _tensors_of(delta: Delta) -> list[Tensor]:
    shared = list(delta.shared.parameters()) if delta.shared is not None else []
    return [*delta.parameters(), *delta.buffers(), *shared]


def working_matrix(host: Host, dtype: torch.dtype) -> Tensor:
    """The host's unmerged base weight in the matrix view, in `dtype` (the delta's: float32 for half bases)."""
    return to_matrix(host.info, host.weight()).detach().to(dtype)


# ---- LoRA-XS ----------------------------------------------------------------------------------------------------------
def truncated_svd(matrix: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r (U (m, r), S (r,), Vh (r, n)), each pair's sign fixed so u_i's largest-magnitude entry is positive."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(r, device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, s, vh * signs.unsqueeze(1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraXsConfig(ScaledRankConfig):
    """Attributes (besides r, alpha, dropout):
    init_std: standard deviation of R's Gaussian init (the authors' code: 1e-5); 0 starts from R = 0 exactly.
    """

    init_std: float = 1e-5

    def validate(self) -> None:
        super().validate()
        if self.init_std < 0:
            raise DeltatuneError(f"{self.method}: init_std must be >= 0, got {self.init_std}; use 0 for R = 0")


class LoraXsDelta(FactoredDelta):
    """y = base(x) + s·B·R·A·x with A, B frozen from the SVD of the base weight."""

    identity_at_init = False  # R starts at N(0, 1e-5²), not 0 (init_std=0 gives an exact identity)

    def __init__(self, config: LoraXsConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.take_rank(config, min(info.out_features, info.fan_in))
        # Frozen and not saved: recomputed from the base weight in setup().
        self.register_buffer("lora_A", torch.zeros(self.r, info.fan_in), persistent=False)
        self.register_buffer("lora_B", torch.zeros(info.out_features, self.r), persistent=False)
        self.lora_R = nn.Parameter(torch.zeros(self.r, self.r))
        if config.init_std > 0:
            nn.init.normal_(self.lora_R, std=config.init_std)

    def setup(self, host: Host) -> None:
        u, s, vh = truncated_svd(working_matrix(host, self.lora_R.dtype), self.r)
        self.lora_B.copy_(u)
        self.lora_A.copy_(s.unsqueeze(1) * vh)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_R @ self.lora_A, self.lora_B * self.scaling

    @classmethod
    def num_parameters(cls, config: LoraXsConfig, info: HostInfo, path: str) -> int:
        return config.r**2


PAPER = ("LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., 2024) "
         "https://arxiv.org/abs/2405.17604")
register_method("lora_xs", config=LoraXsConfig, family="low-rank", paper=PAPER)(LoraXsDelta)
