"""Factored weight deltas, ΔW = up · down in the matrix view, and the helpers the low-rank methods share.

A helper module: it registers no method. A method subclasses `FactoredDelta` and gives `factors(host)` =
(down (k, fan_in), up (out_features, k)) with every scaling folded in (most factors ignore the host; those built on
the base weight read it). It gets:
- `forward`: on Linear / Conv1D / Embedding the factors are applied without forming ΔW — down as a matmul or a
  look-up in down.t() (a (vocab, k) table), up fused into the host's output as one `addmm_` in y's dtype, in place
  when `Host.may_overwrite` allows (LoRA's fast path); convolutions run one convolution with the dense ΔW
  (`delta_weight`), their kernels being small. Dropout acts on the input when the subclass sets `self.dropout`.
- `delta_weight`: up @ down in the host's layout (and `delta_bias`, when the subclass gives one, is added too).
- a gathered mixed-batch `per_row`: every delta's factors zero-padded to the largest k and stacked with an all-zero
  slot for rows without an adapter, gathered per row and applied with `bmm` + an in-place `baddbmm_` (grouped
  convolutions on conv hosts). Without gradients the stack is kept in the slot's `kernel_cache` across routing
  changes, keyed by the version counters of every tensor the factors read, so a load or an optimizer step
  invalidates it.

Also here: the config checks, PEFT allowlist and inits shared by the low-rank methods, and the small dense and
per-row helpers other methods build on (`add_dense`, `gather_rows`, `rows_per_channel`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, base_weight_parameter, from_matrix, per_channel, to_matrix
from ..core.slot import Host


# ---- config checks and inits ----------------------------------------------------------------------------------------
def check_positive(method: str, **values: float) -> None:
    """One error naming every field that must be > 0 and is not."""
    bad = [f"{name} must be > 0 (got {value})" for name, value in values.items() if value <= 0]
    if bad:
        raise DeltatuneError(f"{method}: {', '.join(bad)}; set a positive value")


def check_dropout(method: str, value: float, name: str = "dropout") -> None:
    if not 0.0 <= value < 1.0:
        raise DeltatuneError(f"{method}: {name} must be in [0, 1), got {value}")


def check_rank(config: DeltaConfig, r: int, rank_pattern: dict | None = None) -> None:
    """r and every rank_pattern value must be > 0."""
    rank_pattern = rank_pattern or {}
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        pattern = f", rank_pattern={rank_pattern}" if rank_pattern else ""
        raise DeltatuneError(f"{config.method}: r must be > 0, got r={r}{pattern}")


def check_rank_and_dropout(config: DeltaConfig, r: int, dropout: float, rank_pattern: dict | None = None) -> None:
    """The checks every low-rank config shares: ranks > 0 (r and every rank_pattern value) and dropout in [0, 1)."""
    check_rank(config, r, rank_pattern)
    check_dropout(config.method, dropout)


def is_empty(value: Any) -> bool:
    """A PEFT config value that asks for nothing (unset, off or empty)."""
    return value in (None, False, "", [], {})


def refuse_unknown_peft_fields(title: str, raw: dict, known: Iterable[str]) -> None:
    """PEFT config loading is an allowlist: a field we cannot reproduce, set to a non-empty value, is an error."""
    known = set(known)
    unknown = sorted(k for k, v in raw.items() if k not in known and not is_empty(v))
    if unknown:
        raise DeltatuneError(f"PEFT {title} field {unknown[0]}={raw[unknown[0]]!r} is not supported by deltatune")


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
        check_rank_and_dropout(self, self.r, self.dropout)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledRankConfig(RankConfig):
    """Attributes (besides RankConfig's):
    alpha: scaling numerator, s = alpha / r (as in LoRA).
    """

    alpha: float = 16.0


def kaiming_(*tensors: Tensor) -> Tensor:
    """nn.Linear's default init (Kaiming-uniform, a = √5, as LoRA's A), in place; returns the (last) tensor."""
    for tensor in tensors:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensors[-1]


def kaiming_rows(shape: tuple[int, ...]) -> Tensor:
    """LoRA's A init (bound 1/√fan_in) for a new factor whose *last* dim is its fan-in, however many dims it has."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound)


def working_matrix(host: Host, dtype: torch.dtype) -> Tensor:
    """The host's unmerged base weight in the matrix view, detached, in `dtype` (the delta's)."""
    return to_matrix(host.info, host.weight()).detach().to(dtype)


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of a matrix: U_r (out, r), σ_r (r,), V_rᵀ (r, in), computed in float32."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def split_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-r approximation of a matrix as (down = √σ_r·V_rᵀ (r, in), up = U_r·√σ_r (out, r))."""
    u, s, vh = svd_factors(weight, rank)
    root = s.sqrt()
    return root.unsqueeze(1) * vh, u * root


# ---- small helpers: dense updates and per-row gathers ---------------------------------------------------------------
def dropped_input(delta: Delta, x: Tensor) -> Tensor:
    """Dropout on a delta's input while training (`delta.dropout`); never on an Embedding's token ids."""
    if delta.dropout and delta.training and delta.info.kind != "embedding":
        return F.dropout(x, delta.dropout, training=True)
    return x


def add_dense(x: Tensor, y: Tensor, host: Host, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y + the host's own op applied with ΔW (native layout) (+ Δb)."""
    out = y + host.apply(x, weight).to(y.dtype)
    return out if bias is None else out + per_channel(host.info, bias.to(y.dtype), out.ndim)


def slot_index(slots: Tensor, count: int) -> Tensor:
    """Each row's index into a stack of `count` per-delta tensors plus a last all-zero one (rows without adapter)."""
    return torch.where(slots < 0, count, slots)


def gather_rows(per_delta: list[Tensor], slots: Tensor) -> Tensor:
    """Batch row i gets per_delta[slots[i]], or zeros where slots[i] < 0 (no adapter): (batch, *shape)."""
    stack = torch.stack([*per_delta, torch.zeros_like(per_delta[0])])
    return stack[slot_index(slots, len(per_delta))]


def rows_per_channel(info: HostInfo, rows: Tensor, ndim: int) -> Tensor:
    """Shape per-row vectors (batch, out) to broadcast against a host output with `ndim` dims."""
    if info.channel_dim == 1:
        return rows.view(*rows.shape, *([1] * (ndim - 2)))
    return rows.view(rows.shape[0], *([1] * (ndim - 2)), rows.shape[1])


def down_project(x: Tensor, down: Tensor, host: Host) -> Tensor:
    """x·downᵀ (..., k) on a Linear / Conv1D host, or the rows of down.t() that an Embedding's token ids pick."""
    if host.info.kind == "embedding":
        return host.apply(x, down.t())
    return F.linear(x.to(down.dtype), down)


def low_rank_output(x: Tensor, host: Host, down: Tensor, up: Tensor) -> Tensor:
    """up·down·x (..., out) on a Linear / Conv1D / Embedding host, as a new tensor."""
    return F.linear(down_project(x, down, host), up)


def fuse_update(y: Tensor, h: Tensor, up: Tensor, host: Host, alpha: float = 1.0,
                bias: Tensor | None = None) -> Tensor:
    """y + alpha·h·upᵀ (+ Δb) as one addmm in y's dtype (bf16 under autocast), written into y itself when
    `host.may_overwrite(y)`; gradients still reach float32 factors through the casts. h: (..., k), up: (out, k)."""
    h = h.reshape(-1, up.shape[1]).to(y.dtype)
    flat = y.view(-1, y.shape[-1]) if host.may_overwrite(y) else y.reshape(-1, y.shape[-1]).clone()
    flat.addmm_(h, up.t().to(y.dtype), alpha=alpha)
    if bias is not None:
        flat.add_(bias.to(y.dtype))
    return flat.view(y.shape)


# ---- the factored base ----------------------------------------------------------------------------------------------
class FactoredDelta(Delta):
    """ΔW = up · down in the matrix view, every scaling folded into the factors. Subclasses give `factors(host)`."""

    dropout: float = 0.0
    gather_while_training = True  # False when forward has side effects the gathered kernel would skip

    def take_rank(self, config: RankConfig, limit: int | None = None) -> None:
        """r (checked against `limit`), dropout and the scaling s = alpha / r (1 without alpha) from the config."""
        self.r = config.r
        self.check_rank(self.r, limit)
        self.dropout = config.dropout
        self.scaling = config.alpha / config.r if isinstance(config, ScaledRankConfig) else 1.0

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """(down (k, fan_in), up (out_features, k)) in the delta's dtype, ΔW = up @ down."""
        raise NotImplementedError(f"{type(self).__name__} must give its factors")

    def factor_state(self) -> tuple:
        """What the factors depend on besides tensors (e.g. a rank chosen at run time), for the kernel cache."""
        return ()

    def dropped(self, x: Tensor) -> Tensor:
        return dropped_input(self, x)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind in CONV_KINDS:  # kernels are small: one convolution with ΔW
            return add_dense(self.dropped(x), y, host, self.delta_weight(host), self.delta_bias(host))
        down, up = self.factors(host)
        return fuse_update(y, down_project(self.dropped(x), down, host), up, host, bias=self.delta_bias(host))

    def delta_weight(self, host: Host) -> Tensor:
        down, up = self.factors(host)
        return from_matrix(self.info, up @ down)

    # ---- mixed batches: one gathered bmm per host, whatever the number of adapters -------------------------------
    @classmethod
    def gatherable(cls, deltas: list[FactoredDelta], host: Host) -> bool:
        """The gathered kernel covers inference and dropout-free training; else each adapter runs on its rows."""
        if any(d.training and (d.dropout or not cls.gather_while_training) for d in deltas):
            return False
        return host.info.kind not in CONV_KINDS or host.module.padding_mode == "zeros"

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if not cls.gatherable(deltas, host):
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        rows = row_factors(deltas, slots, host, cache)
        if host.info.kind in CONV_KINDS or y.dtype != rows.downs.dtype:
            update, bias = gathered_output(rows, x, host)
            if bias is not None:
                update = update + rows_per_channel(host.info, bias, update.ndim)
            return y + update.to(y.dtype)
        # y + h·up_rowᵀ as one batched baddbmm, in place when allowed.
        h = gathered_down(rows, x, host)
        batch = y.shape[0]
        flat = y.view(batch, -1, y.shape[-1]) if host.may_overwrite(y) else y.reshape(batch, -1, y.shape[-1]).clone()
        flat.baddbmm_(h, rows.ups.transpose(1, 2))
        if rows.bias is not None:
            flat.add_(rows.bias.unsqueeze(1))
        return flat.view(y.shape)


@dataclasses.dataclass
class RowFactors:
    """The gathered kernel's inputs for one routing: each row's slot, the stacked downs (K+1, k_max, fan_in), and
    per row the down (batch, k_max, fan_in), the up (batch, out, k_max) and Δb (batch, out) | None."""

    index: Tensor
    stack: Tensor
    downs: Tensor
    ups: Tensor
    bias: Tensor | None


def row_factors(deltas: list[FactoredDelta], slots: Tensor, host: Host, cache: dict) -> RowFactors:
    """Each row's factors. Without gradients they are cached: the stack across routing changes (keyed by the deltas
    and the version counters of their tensors, so a load or an optimizer step invalidates it), the per-row gathers
    for this routing. While training, parameters change between steps and everything is rebuilt inside the graph."""
    rows = cache.get("rows")
    if rows is not None:
        return rows
    if torch.is_grad_enabled():
        downs, ups, bias = stack_factors(deltas, host)
    else:
        store = cache["kernel_cache"]
        key = tuple(_versions(d, host) for d in deltas)
        if store.get("key") != key:
            store["key"], store["stack"] = key, stack_factors(deltas, host)
        downs, ups, bias = store["stack"]
    idx = slot_index(slots, len(deltas))
    rows = RowFactors(idx, downs, downs[idx], ups[idx], None if bias is None else bias[idx])
    if not torch.is_grad_enabled():
        cache["rows"] = rows
    return rows


def _versions(delta: Delta, host: Host) -> tuple:
    """What the cached stack of `delta` depends on: its tensors, its shared module's, and the base weight's (their
    version counters, bumped by in-place writes, and storages, replaced by a move to another device or dtype)."""
    tensors = [*delta.parameters(), *delta.buffers()]
    if delta.shared is not None:
        tensors += [*delta.shared.parameters(), *delta.shared.buffers()]
    if delta.uses_base_weight:
        tensors.append(base_weight_parameter(host.module))
    return (id(delta), *delta.factor_state(), *((t._version, t.data_ptr()) for t in tensors))


def stack_factors(deltas: list[FactoredDelta], host: Host) -> tuple[Tensor, Tensor, Tensor | None]:
    """down (K+1, k_max, fan_in), up (K+1, out, k_max), Δb (K+1, out) | None, zero-padded to the largest k; the last
    slot is all zeros (no adapter)."""
    pairs = [d.factors(host) for d in deltas]
    k_max = max(down.shape[0] for down, _ in pairs)
    downs = [F.pad(down, (0, 0, 0, k_max - down.shape[0])) for down, _ in pairs]
    ups = [F.pad(up, (0, k_max - up.shape[1])) for _, up in pairs]
    zero_down, zero_up = torch.zeros_like(downs[0]), torch.zeros_like(ups[0])
    biases = [d.delta_bias(host) for d in deltas]
    bias = None
    if any(b is not None for b in biases):
        zero = zero_up.new_zeros(host.info.out_features)
        bias = torch.stack([zero if b is None else b for b in biases] + [zero])
    return torch.stack(downs + [zero_down]), torch.stack(ups + [zero_up]), bias


def gathered_down(rows: RowFactors, x: Tensor, host: Host) -> Tensor:
    """Per-row down·x for Linear / Conv1D / Embedding: (batch, tokens, k_max)."""
    batch, k = x.shape[0], rows.stack.shape[1]
    if host.info.kind == "embedding":
        table = rows.stack.transpose(1, 2).reshape(-1, k)  # ((K+1)·vocab, k)
        offsets = (rows.index * host.info.in_features).view(batch, *([1] * (x.ndim - 1)))
        return F.embedding(x + offsets, table).reshape(batch, -1, k)
    return torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(rows.stack.dtype), rows.downs.transpose(1, 2))


def gathered_output(rows: RowFactors, x: Tensor, host: Host) -> tuple[Tensor, Tensor | None]:
    """Per-row up·down·x in the host's output layout, and per-row Δb (batch, out) | None."""
    info = host.info
    if info.kind not in CONV_KINDS:
        out = torch.bmm(gathered_down(rows, x, host), rows.ups.transpose(1, 2))
        lead = x.shape if info.kind == "embedding" else x.shape[:-1]
        return out.reshape(*lead, -1), rows.bias
    batch, k, module = x.shape[0], rows.stack.shape[1], host.module
    # Grouped convolutions with one group per row: each row convolved with its own adapter's factors.
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(info.kernel_size) - 1]
    downs = rows.downs.reshape(batch * k, info.in_features, *info.kernel_size)
    h = conv(x.reshape(1, -1, *x.shape[2:]).to(downs.dtype), downs, None, module.stride, module.padding,
             module.dilation, batch)  # (1, batch·k, *spatial)
    ups = rows.ups.reshape(batch * info.out_features, k, *([1] * len(info.kernel_size)))
    out = conv(h, ups, None, 1, 0, 1, batch)
    return out.reshape(batch, info.out_features, *out.shape[2:]), rows.bias
