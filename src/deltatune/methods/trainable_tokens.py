"""Trainable tokens: retrain a few rows of an embedding table (new or existing tokens) and nothing else.

PEFT's TRAINABLE_TOKENS method (no paper of its own; it is the sparse form of "train the embeddings of added tokens").
The registry cites LT-SFT, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", Ansell et al., 2021,
https://arxiv.org/abs/2110.07560, whose sparse row-wise difference this is a structured case of.

Update rule (embedding table E of shape vocab × d, selected token ids T = token_indices):
    E'[t] = E[t] + Δ[t] for t in T,  E'[t] = E[t] otherwise;  i.e. ΔE is zero outside the rows T.
Init: Δ = 0, so the model is unchanged at step 0.
Shapes: Δ (|T|, d). On disk as PEFT's `trainable_tokens_delta`, which holds the new rows E[T] + Δ themselves
(deltatune keeps the difference from the base and converts on save / load).

Limitation: a model whose output head shares the embedding's weight (tied embeddings) sees the change in the input
embedding only; PEFT also adapts the tied head. Use an untied model, or compare on the input side only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import refuse_unknown_peft_fields, slot_index
from .sparse_ft import PAPER as LT_SFT_PAPER

_KEY = "trainable_tokens_delta"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableTokensConfig(DeltaConfig):
    """Attributes:
    token_indices: the token ids whose embedding rows train (distinct, non-negative, below the vocabulary size).
    """

    token_indices: list[int] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        ids = self.token_indices
        if any(t < 0 for t in ids):
            raise DeltatuneError(f"trainable_tokens: token_indices must be >= 0, got {sorted(t for t in ids if t < 0)}")
        if len(set(ids)) != len(ids):
            repeated = sorted({t for t in ids if ids.count(t) > 1})
            raise DeltatuneError(f"trainable_tokens: token_indices has repeated ids {repeated}; list each once")


class TrainableTokensDelta(Delta):
    """y = base(ids) + Δ[position(ids)], with position(t) = the row of t in Δ, or a zero row for other tokens."""

    def __init__(self, config: TrainableTokensConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        ids = config.token_indices
        if not ids:
            raise DeltatuneError(f"trainable_tokens: token_indices is empty for {path!r}; list the token ids to train")
        if max(ids) >= info.in_features:
            raise DeltatuneError(
                f"trainable_tokens: token id {max(ids)} is outside the vocabulary of {path!r} ({info.in_features} "
                "tokens); resize the embedding first or fix token_indices"
            )
        self.token_delta = nn.Parameter(torch.zeros(len(ids), info.out_features))
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        # position[t]: row of token t in token_delta, len(ids) (a zero row) for the others
        position = torch.full((info.in_features,), len(ids), dtype=torch.long)
        position[self.token_ids] = torch.arange(len(ids))
        self.register_buffer("position", position, persistent=False)

    def setup(self, host: Host) -> None:
        if host.module.max_norm is not None:
            raise DeltatuneError(
                f"trainable_tokens: embedding {self.path!r} renormalises rows (max_norm={host.module.max_norm}), so "
                "a row update would not be additive; not supported"
            )

    def table(self) -> Tensor:
        """Δ with a trailing zero row: (|T| + 1, d)."""
        return F.pad(self.token_delta, (0, 0, 0, 1))

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return y + F.embedding(self.position[x], self.table()).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        delta = self.token_delta.new_zeros(self.info.weight_shape)  # (vocab, d)
        return delta.index_copy(0, self.token_ids, self.token_delta)

    @classmethod
    def num_parameters(cls, config: TrainableTokensConfig, info: HostInfo, path: str) -> int:
        return len(config.token_indices) * info.out_features

    # ---- on disk: PEFT stores the new rows themselves -----------------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        rows = host.weight().index_select(0, self.token_ids).to(self.token_delta.dtype)
        return {_KEY: (rows + self.token_delta).detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        rows = host.weight().index_select(0, self.token_ids).to(self.token_delta.dtype)
        with torch.no_grad():
            self.token_delta.copy_(tensors[_KEY] - rows)

    # ---- mixed batches: one lookup in the stacked rows of every adapter -----------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        tables = [d.token_delta for d in deltas]
        offsets = [0]
        for t in tables:
            offsets.append(offsets[-1] + t.shape[0])
        zero_row = offsets[-1]
        # positions[k, t]: row of token t in the stacked table for adapter k (the zero row where t is not trained);
        # the last slot (no adapter) maps every token to the zero row.
        positions = torch.stack(
            [torch.where(d.position == d.token_ids.numel(), zero_row, d.position + off)
             for d, off in zip(deltas, offsets)] + [torch.full_like(deltas[0].position, zero_row)])
        table = F.pad(torch.cat(tables), (0, 0, 0, 1))
        idx = slot_index(slots, len(deltas)).view(-1, *([1] * (x.ndim - 1)))
        return y + F.embedding(positions[idx, x], table).to(y.dtype)


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("TRAINABLE_TOKENS", raw, ("token_indices", "init_weights"))
    indices = raw.get("token_indices")
    if not isinstance(indices, list):
        raise DeltatuneError(f"PEFT TRAINABLE_TOKENS token_indices must be a list of token ids, got {indices!r}")
    return {"token_indices": indices}


register_method(
    "trainable_tokens", config=TrainableTokensConfig, family="selective", paper=LT_SFT_PAPER, hosts=("embedding",),
    peft=PeftFormat("TRAINABLE_TOKENS", lambda c: {"token_indices": list(c.token_indices), "init_weights": True},
                    _from_peft, lambda raw: True),
)(TrainableTokensDelta)
