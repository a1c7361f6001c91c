"""A ragged KV cache for continuous batching, and the attention function that reads it.

Every running sequence owns a *slot* in a per-layer pool of keys and values (slots × kv_heads × capacity × head_dim),
so rows can join and leave a batch without copying anyone's cache: a forward pass names, for each batch row, its
slot, how many tokens it already has and how many new ones it brings (`RaggedCache`).

Attention runs row by row on each sequence's exact keys (no padding, no mask), through transformers' own SDPA
function with batch 1. That is exactly what `model.generate` computes for a single prompt, so a request's tokens do
not depend on which other rows share its batch: attention sees only the row's own cache, and the linear layers give
each decode row its bits alone in bf16 up to 32 rows per step (prompts are prefilled one per forward, see
`Engine._prefill`; in fp32 MKL's kernels change with the row count, so there only the rounding can differ). The
model must use transformers' attention interface (`_supports_attention_backend`) and full attention in every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError

ATTENTION_NAME = "deltatune_ragged"


class RowViews(list):
    """Per-row key (or value) tensors of one layer, with the number of new (query) tokens of each row."""

    query_lengths: list[int]


class KVPool:
    """Keys and values of every slot, per layer, allocated on first use and grown (doubling) in length."""

    def __init__(self, slots: int, capacity: int = 128) -> None:
        self.slots = slots
        self.capacity = capacity
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def layer(self, layer_idx: int, like: Tensor, needed: int) -> tuple[Tensor, Tensor]:
        """(keys, values) of one layer with room for `needed` positions, shaped after `like` (B, heads, q, dim)."""
        keys = self.keys.get(layer_idx)
        if keys is None or keys.shape[2] < needed or keys.dtype != like.dtype:
            capacity = max(self.capacity, keys.shape[2] if keys is not None else 0)
            while capacity < needed:
                capacity *= 2
            self.capacity = capacity
            self.keys[layer_idx] = self._grown(keys, like, capacity)
            self.values[layer_idx] = self._grown(self.values.get(layer_idx), like, capacity)
        return self.keys[layer_idx], self.values[layer_idx]

    def _grown(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        fresh = like.new_zeros(self.slots, like.shape[1], capacity, like.shape[3])
        if old is not None and old.dtype == like.dtype:
            fresh[:, :, : old.shape[2]] = old
        return fresh

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


class RaggedCache:
    """The cache argument of one forward pass: row i writes its new keys at slot[i], positions
    starts[i] .. starts[i] + lengths[i], and attends to everything its slot holds up to there."""

    is_compileable = False

    def __init__(self, pool: KVPool, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        self.pool = pool
        self.slots = slots
        self.starts = starts
        self.lengths = lengths
        self.ends = [s + n for s, n in zip(starts, lengths)]
        self.single_token = all(n == 1 for n in lengths)
        if self.single_token:
            self.slot_index = torch.tensor(slots)
            self.start_index = torch.tensor(starts)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.ends)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[RowViews, RowViews]:
        keys, values = self.pool.layer(layer_idx, key, max(self.ends))
        if self.single_token:  # decode: one batched scatter per tensor
            keys[self.slot_index, :, self.start_index] = key[:, :, 0]
            values[self.slot_index, :, self.start_index] = value[:, :, 0]
        else:
            for i, (slot, start, count) in enumerate(zip(self.slots, self.starts, self.lengths)):
                keys[slot, :, start:start + count] = key[i, :, :count]
                values[slot, :, start:start + count] = value[i, :, :count]
        return self._views(keys), self._views(values)

    def _views(self, pool: Tensor) -> RowViews:
        views = RowViews(pool[slot:slot + 1, :, :end] for slot, end in zip(self.slots, self.ends))
        views.query_lengths = self.lengths
        return views


def ragged_attention(module: nn.Module, query: Tensor, key: RowViews, value: RowViews, attention_mask, **kwargs):
    """Each row attends causally to its own cache through transformers' SDPA function (batch 1, no mask).
    Rows with fewer new tokens than the longest (a batched prefill) are right-padded with zeros."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, RowViews):
        raise DeltatuneError("the serving attention needs the serving KV cache (RaggedCache)")
    width = query.shape[2]
    outputs = []
    for i, length in enumerate(key.query_lengths):
        out, _ = sdpa_attention_forward(module, query[i:i + 1, :, :length], key[i], value[i], None, **kwargs)
        if length < width:
            out = torch.cat([out, out.new_zeros(1, width - length, *out.shape[2:])], dim=1)
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def prepare_model(model: nn.Module) -> None:
    """Route the model's attention through `ragged_attention`, or say why this model cannot be served."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        raise DeltatuneError(
            f"{type(model).__name__} does not use transformers' attention interface; deltatune serve needs a "
            "transformers causal LM that does (Llama, Mistral, Qwen2, GPT-2, ...)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise DeltatuneError(f"{type(model).__name__} is an encoder-decoder model; deltatune serve needs a causal LM")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"} or getattr(config, "sliding_window", None):
        raise DeltatuneError(
            f"{type(model).__name__} uses attention layers {sorted(layer_types)} / a sliding window; deltatune serve "
            "supports models with full attention in every layer"
        )
    AttentionInterface.register(ATTENTION_NAME, ragged_attention)
    config._attn_implementation = ATTENTION_NAME
