"""LoReFT and DiReFT: "ReFT: Representation Finetuning for Language Models", Wu et al., 2024,
https://arxiv.org/abs/2404.03592

Interventions on hidden representations h (a layer's output) at chosen positions, the model's weights untouched:
- LoReFT: Φ(h) = h + Rᵀ(W·h + b − R·h), R (r × d) with orthonormal rows, W (r × d), b (r);
- DiReFT: Φ(h) = h + W₂ᵀ(W₁·h + b), W₁, W₂ (r × d) unconstrained (no orthogonality, no difference term).
Both are an edit (h·Pᵀ + b)·Q with P = W − R, Q = R (LoReFT) or P = W₁, Q = W₂ (DiReFT), which is how mixed batches
gather them per row (two bmm). R is an orthonormalisation of a free matrix (QR with signs fixed, so R is a smooth
function of it and stays orthonormal after any optimizer step); the file stores R itself.
Positions: the first `first_n` and last `last_n` real (not padding) tokens of the prompt, i.e. of the prefill call;
decode steps of `generate` (calls with a KV cache already holding this layer's past) are not intervened on, their
prompt positions having been edited during prefill. Padding is read from the layer's attention mask (left or right
padded). A call's "prompt" is the whole call unless `prompt_lengths(model, lengths)` says how many real tokens of
each row are prompt (for training on prompt + completion sequences: `training_positions(model, batch)` reads
them from the batch's labels, so training edits the positions generation edits). Outputs without a sequence dimension (batch,
features) are edited everywhere.
Layers: `targets=None` puts an intervention on every transformer layer (Llama `model.layers.N`, GPT-2
`transformer.h.N`, BERT `encoder.layer.N`); `layers=[...]` keeps some of them.
Init ("paper"): R with random orthonormal rows, W and b as nn.Linear(d, r) (LoReFT); W₁, b as nn.Linear, W₂ with
random orthonormal rows (DiReFT) — not the identity. "identity": W = R, b = 0 (LoReFT) or W₂ = 0 (DiReFT).
Parameters: 2·r·d + r per layer for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import MODULE_KIND, HostInfo
from ..core.registry import register_method
from ..core.slot import Host, require_state
from .bottleneck import Affine, call_arguments, decoder_layers, pad_rank
from .factored import gather_rows, slot_index


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReftConfig(DeltaConfig):
    """Attributes:
    r: rank of the intervention (rows of R / W).
    first_n: intervene on the first first_n real prompt tokens.
    last_n: intervene on the last last_n real prompt tokens.
    init: "paper" (as pyreft: not the identity) or "identity" (the model is unchanged at step 0).
    """

    r: int = 4
    first_n: int = 1
    last_n: int = 1
    init: Literal["paper", "identity"] = "paper"

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.first_n < 0 or self.last_n < 0 or self.first_n + self.last_n == 0:
            raise DeltatuneError(f"{self.method}: need r > 0, first_n >= 0, last_n >= 0 and at least one position; "
                                 f"got r={self.r}, first_n={self.first_n}, last_n={self.last_n}")

    def default_targets(self, model):
        return decoder_layers(model)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoreftConfig(ReftConfig):
    """LoReFT."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DireftConfig(ReftConfig):
    """DiReFT."""


# ---- which positions a call edits ------------------------------------------------------------------------------------
@dataclasses.dataclass
class CallPositions:
    """What the host's inputs tell about one call: real-token mask (batch, tokens) or None (all real), whether it is
    a prefill call, and the number of prompt tokens per row (None: every real token)."""

    real: Tensor | None = None
    prefill: bool = True
    prompt_lengths: Tensor | None = None


IGNORE_LABEL = -100  # the label of tokens that carry no loss (the prompt, padding)

# id(RoutingState) -> (weak reference to it, (batch,) lengths); RoutingState is an unhashable dataclass.
_PROMPT_LENGTHS: dict[int, tuple[weakref.ref, Tensor]] = {}


def _lengths_for(state) -> Tensor | None:
    entry = _PROMPT_LENGTHS.get(id(state))
    return entry[1] if entry is not None and entry[0]() is state else None


@contextlib.contextmanager
def prompt_lengths(model: nn.Module, lengths: Tensor | list[int]):
    """Within the block, row i's prompt is its first lengths[i] real tokens (instead of the whole call)."""
    state = require_state(model)
    previous = _PROMPT_LENGTHS.get(id(state))
    _PROMPT_LENGTHS[id(state)] = (weakref.ref(state), torch.as_tensor(lengths).long())
    try:
        yield
    finally:
        if previous is None:
            _PROMPT_LENGTHS.pop(id(state), None)
        else:
            _PROMPT_LENGTHS[id(state)] = previous


def prompt_lengths_from_labels(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(batch,) real prompt tokens per row of a training batch: the real tokens before the row's first loss-carrying
    label (training data labels the prompt -100), so that training edits the positions generation will edit."""
    carries = labels != IGNORE_LABEL
    first = torch.where(carries.any(1), carries.long().argmax(1), torch.full_like(labels[:, 0], labels.shape[1]))
    before = torch.arange(labels.shape[1], device=labels.device) < first.unsqueeze(1)
    real = torch.ones_like(before) if attention_mask is None else attention_mask.bool()
    return (before & real).sum(1)


@contextlib.contextmanager
def training_positions(model: nn.Module, batch: dict):
    """Within the block, ReFT edits each row's prompt positions of a training batch ({"input_ids", "labels",
    "attention_mask"}) instead of the last tokens of prompt + completion."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise DeltatuneError("reft: packed training batches (several examples per row) have no single prompt per "
                             "row; turn sequence packing off for ReFT")
    with prompt_lengths(model, prompt_lengths_from_labels(batch["labels"], mask)):
        yield


def _layer_index(module: nn.Module) -> int | None:
    return next((m.layer_idx for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)


def call_positions(args: tuple, kwargs: dict, host: Host) -> CallPositions:
    """Padding and prefill / decode of this call, from a layer host's attention mask and KV cache."""
    lengths = _lengths_for(host.slot.state)
    if host.info.kind != MODULE_KIND:
        return CallPositions(prompt_lengths=lengths)
    given = call_arguments(host.module, args, kwargs)
    cache = next((given[k] for k in ("cache", "past_key_values", "layer_past") if given.get(k) is not None), None)
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        index = _layer_index(host.module)
        if index is None:
            raise DeltatuneError(f"reft: cannot tell prefill from decode at {host.slot.path!r} (no layer_idx); "
                                 "target the transformer layers")
        past = int(cache.get_seq_length(index))
    mask = given.get("attention_mask")
    tokens = next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)).shape[1]
    return CallPositions(_real_tokens(mask, past, tokens, host), past == 0, lengths)


def _real_tokens(mask, past: int, tokens: int, host: Host) -> Tensor | None:
    """(batch, tokens) True at real tokens: the keys the last query may attend to (causal and bidirectional masks,
    left or right padding), or the 2-D padding mask itself."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 4):
        raise DeltatuneError(f"reft: unsupported attention mask {type(mask).__name__} at {host.slot.path!r}; use "
                             "the eager or sdpa attention implementation")
    keys = mask if mask.ndim == 2 else mask[:, 0, -1, :]
    real = keys.bool() if keys.dtype == torch.bool or mask.ndim == 2 else keys == 0
    return real[:, past:past + tokens]


def chosen_positions(call: CallPositions | None, y: Tensor, first_n: Tensor, last_n: Tensor) -> Tensor | None:
    """(batch, tokens, 1) 0/1 weights of the edited positions, or None when the call edits nothing (decode).
    first_n / last_n: (batch, 1) per-row counts."""
    call = call or CallPositions()
    if not call.prefill:
        return None
    if y.ndim < 3:
        return torch.ones(y.shape[0], 1, device=y.device, dtype=y.dtype)
    batch, tokens = y.shape[:2]
    real = torch.ones(batch, tokens, dtype=torch.bool, device=y.device) if call.real is None else call.real
    if real.shape != (batch, tokens):
        raise DeltatuneError(f"reft: this call's padding mask is {tuple(real.shape)} but the layer output is "
                             f"{(batch, tokens)}; ReFT cannot run inside Split / BatchSplit (use per_sample)")
    rank = real.long().cumsum(1) - 1  # index among the real tokens
    count = real.sum(1, keepdim=True)
    if call.prompt_lengths is not None:
        count = torch.minimum(count, _per_row(call.prompt_lengths.to(y.device), batch).unsqueeze(1))
    chosen = real & (rank < count) & ((rank < first_n) | (rank >= count - last_n))
    return chosen.unsqueeze(-1).to(y.dtype)


def _per_row(values: Tensor, batch: int) -> Tensor:
    if batch % values.shape[0]:
        raise DeltatuneError(f"reft: prompt_lengths has {values.shape[0]} rows but the batch has {batch}")
    return values.repeat_interleave(batch // values.shape[0])


def orthonormal_rows(matrix: Tensor) -> Tensor:
    """Rows spanning the same space as `matrix`'s rows, orthonormal (QR with the signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(matrix.t())
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).t()


# ---- the deltas ------------------------------------------------------------------------------------------------------
class ReftDelta(Delta):
    """An edit (h·Pᵀ + b)·Q at the chosen positions; subclasses give (P, b, Q) from their parameters."""

    identity_at_init = False  # the paper's init; init="identity" starts as the identity (see identity_for)

    def __init__(self, config: ReftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.d = info.out_features
        self.check_rank(config.r, self.d)
        self.last_call: CallPositions | None = None  # set by pre_forward for the call under way

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def pre_forward(self, args: tuple, kwargs: dict, host: Host) -> tuple[tuple, dict]:
        self.last_call = call_positions(args, kwargs, host)
        return args, kwargs

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        counts = torch.tensor([[self.config.first_n, self.config.last_n]], device=y.device)
        where = chosen_positions(self.last_call, y, counts[:, :1], counts[:, 1:])
        if where is None:
            return y
        into, bias, out = self.factors()
        edit = (torch.nn.functional.linear(y.to(into.dtype), into, bias) @ out).to(y.dtype)
        return y + where * edit

    @classmethod
    def per_row_pre_forward(cls, deltas, slots, args, kwargs, host, cache):
        cache["call"] = call_positions(args, kwargs, host)
        return args, kwargs

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        index = slot_index(slots, len(deltas))
        counts = torch.tensor([[d.config.first_n, d.config.last_n] for d in deltas] + [[0, 0]], device=y.device)
        where = chosen_positions(cache.get("call"), y, counts[index, :1], counts[index, 1:])
        if where is None:
            return y
        parts = [d.factors() for d in deltas]
        r_max = max(p[0].shape[0] for p in parts)
        into, bias, out = (gather_rows([pad_rank(p[k], r_max) for p in parts], slots) for k in range(3))
        h = y.reshape(y.shape[0], -1, y.shape[-1]).to(into.dtype)
        z = torch.baddbmm(bias.unsqueeze(1), h, into.transpose(1, 2))  # (batch, tokens, r_max)
        edit = torch.bmm(z, out).reshape(y.shape).to(y.dtype)
        return y + where * edit

    @classmethod
    def training_batch(cls, model: nn.Module, batch: dict):
        """The context a trainer enters around one training batch's forward (see `training_positions`)."""
        return training_positions(model, batch)

    @classmethod
    def num_parameters(cls, config: ReftConfig, info: HostInfo, path: str) -> int:
        return 2 * config.r * info.out_features + config.r

    @classmethod
    def identity_for(cls, config: ReftConfig) -> bool:
        return config.init == "identity"


def linear_init(r: int, d: int) -> tuple[nn.Parameter, nn.Parameter]:
    """nn.Linear(d, r)'s default weight and bias."""
    layer = Affine(d, r)
    return layer.weight, layer.bias


def random_orthonormal(r: int, d: int) -> Tensor:
    return nn.init.orthogonal_(torch.empty(r, d))


class LoreftDelta(ReftDelta):
    """h + Rᵀ(W·h + b − R·h), R = orthonormal_rows(rotation)."""

    def __init__(self, config: ReftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.rotation = nn.Parameter(random_orthonormal(config.r, self.d))
        self.weight, self.bias = linear_init(config.r, self.d)
        if config.init == "identity":
            with torch.no_grad():
                self.weight.copy_(orthonormal_rows(self.rotation))
                self.bias.zero_()

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        rotation = orthonormal_rows(self.rotation)
        return self.weight - rotation, self.bias, rotation

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"rotation": orthonormal_rows(self.rotation).detach(), "weight": self.weight.detach(),
                "bias": self.bias.detach()}


class DireftDelta(ReftDelta):
    """h + W₂ᵀ(W₁·h + b)."""

    def __init__(self, config: ReftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.weight, self.bias = linear_init(config.r, self.d)
        self.out = nn.Parameter(torch.zeros(config.r, self.d) if config.init == "identity"
                                else random_orthonormal(config.r, self.d))

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.weight, self.bias, self.out


HOSTS = (MODULE_KIND, "linear", "conv1d_hf", "embedding", "norm")
PAPER = "ReFT: Representation Finetuning for Language Models (Wu et al., 2024) https://arxiv.org/abs/2404.03592"
register_method("loreft", config=LoreftConfig, family="representation", paper=PAPER, hosts=HOSTS)(LoreftDelta)
register_method("direft", config=DireftConfig, family="representation", paper=PAPER, hosts=HOSTS)(DireftDelta)
