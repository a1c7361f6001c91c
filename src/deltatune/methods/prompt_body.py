"""How prompt-style deltas (prompt tuning, P-tuning, prefix tuning, DePT) rewrite a transformer body's inputs.

These methods sit on the model *body* (`model.base_model`, e.g. a LlamaModel), so both `model(...)` /
`model.generate(...)` and deltatune's training loss (body, then the LM head at loss positions) go through them.
Before the body runs, the batch's inputs are rewritten once for all rows:

- virtual input tokens are prepended to the token embeddings (prompt tuning, P-tuning, DePT's short prompt),
- key/value prefixes are written into a fresh `DynamicCache` before any real token (prefix tuning),
- per-position updates are added to the real tokens' embeddings (DePT),
- the attention mask gets the virtual slots and real positions are shifted by each row's number of virtual tokens,
  so the real tokens see exactly what they would see if the row ran alone.

In a mixed batch rows carry different numbers of virtual tokens: each row's tokens are left-padded with masked
slots up to the longest (`width`), so a row equals itself run alone. The KV cache remembers the slots (`MARK`),
so later calls of the same sequence (generate's decoding steps) extend the mask and shift positions the same way.
The body's output is stripped of the virtual input positions afterwards (the delta's `forward`), so it lines up
with the real tokens for the loss and for generate.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError

MARK = "_deltatune_virtual_slots"  # attribute on a KV cache whose first positions are virtual slots
CACHE_NAMES = ("cache", "past_key_values")  # transformers 5 renamed past_key_values to cache


@dataclass(frozen=True)
class BodyDims:
    """What a prompt-style method needs to know about the body it sits on.

    Attributes:
        hidden: token embedding width d.
        layers: number of attention layers L (None when only the width is known).
        kv_heads: key/value heads per layer.
        head_dim: width of one head.
    """

    hidden: int
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class RowContributions:
    """What each batch row adds. Virtual inputs / prefixes are left-padded to the batch's longest with masked slots.

    Attributes:
        virtual: (B, W_in, d) virtual input embeddings, or None.
        virtual_counts: (B,) real virtual tokens per row.
        prefix: (B, W_pre, L, 2, H, hd) key/value prefixes, or None.
        prefix_counts: (B,) real prefix positions per row.
    """

    virtual: Tensor | None
    virtual_counts: Tensor
    prefix: Tensor | None
    prefix_counts: Tensor


@dataclass
class VirtualSlots:
    """Kept on the KV cache: which of the first `width` cache positions are real virtual slots, and how far each
    row's real positions are shifted."""

    mask: Tensor  # (B, width) bool
    shift: Tensor  # (B,) long

    @property
    def width(self) -> int:
        return self.mask.shape[1]


def body_dims(body: nn.Module, path: str, method: str) -> BodyDims:
    """The dimensions of a transformer body, or one clear error if `body` is not one."""
    params = _parameters(type(body))
    if not hasattr(body, "get_input_embeddings") or "inputs_embeds" not in params or "attention_mask" not in params:
        raise DeltatuneError(
            f"{method}: {path!r} ({type(body).__name__}) is not a transformer body; prompt-style methods sit on the "
            "model body (`model.base_model`, e.g. 'model' of a LlamaForCausalLM): leave targets unset or name it"
        )
    config = body.config.get_text_config() if hasattr(body.config, "get_text_config") else body.config
    hidden = body.get_input_embeddings().embedding_dim
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return BodyDims(hidden, getattr(config, "num_hidden_layers", None), kv_heads, head_dim)


@functools.cache
def _parameters(body_cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(body_cls.forward).parameters)[1:]  # without self


def _bind(body: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Every input by name (positional arguments too), so the rewrite never depends on how the body was called."""
    names = _parameters(type(body))
    if len(args) > len(names):
        raise DeltatuneError(f"{type(body).__name__} got {len(args)} positional arguments; it takes at most "
                             f"{len(names)}")
    bound = dict(zip(names, args))
    overlap = set(bound) & set(kwargs)
    if overlap:
        raise DeltatuneError(f"{type(body).__name__} got {sorted(overlap)} both by position and by name")
    return {**bound, **kwargs}


def _cache_key(body: nn.Module, inputs: dict) -> str:
    present = [k for k in CACHE_NAMES if inputs.get(k) is not None]
    if present:
        return present[0]
    return next((k for k in CACHE_NAMES if k in _parameters(type(body))), CACHE_NAMES[0])


def rewrite_inputs(body: nn.Module, args: tuple, kwargs: dict, rows_of, token_update_of) -> tuple[dict, int]:
    """The body's inputs with every row's virtual tokens / prefixes inserted, and the number of leading output
    positions to strip afterwards.

    rows_of(batch, device) -> RowContributions, asked only when the call starts a new sequence.
    token_update_of(positions, dtype) -> (B, T, d) embedding update at real positions, or None.
    """
    inputs = _bind(body, args, kwargs)
    ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
    source = ids if ids is not None else embeds
    if source is None:
        raise DeltatuneError(f"{type(body).__name__} was called without input_ids or inputs_embeds")
    mask = inputs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise DeltatuneError(
            "prompt-style adapters need a 2-D attention mask (batch, length); packed rows with a 4-D mask are not "
            "supported — set data.packing: false"
        )
    batch, length = source.shape[:2]
    past, rows, slots = _sequence_state(body, inputs, rows_of, batch, source.device)
    past_real = past - slots.width if past and slots is not None else past  # cached real tokens
    real_positions = _real_positions(inputs.get("position_ids"), past_real, batch, length, source.device)
    update = token_update_of(real_positions, body.get_input_embeddings().weight.dtype)
    if update is not None or (rows is not None and rows.virtual is not None):
        embeds = body.get_input_embeddings()(ids) if embeds is None else embeds
        ids = None
        if update is not None:
            embeds = embeds + update.to(embeds.dtype)
    strip = 0
    if slots is not None and slots.width:
        positions = real_positions + slots.shift[:, None]
        if rows is not None and rows.virtual is not None:
            strip = rows.virtual.shape[1]
            embeds = torch.cat([rows.virtual.to(embeds.dtype), embeds], dim=1)
            positions = torch.cat([_virtual_positions(rows), positions], dim=1)
            _extend_token_types(inputs, strip)
        inputs["position_ids"] = positions
        inputs["attention_mask"] = _full_mask(mask, slots, past, length)
    first = {"inputs_embeds": embeds} if ids is None else {"input_ids": ids}  # the body hook's x: a batch tensor
    return {**first, **inputs}, strip


def _sequence_state(body: nn.Module, inputs: dict, rows_of, batch: int, device):
    """(cached positions, the rows' contributions or None, the virtual slots or None). A call on an empty cache
    starts a sequence: the rows' prefixes go into the cache, which remembers the slots for the calls that follow."""
    key = _cache_key(body, inputs)
    cache = inputs.get(key)
    past = cache.get_seq_length() if cache is not None else 0
    if past:
        return past, None, getattr(cache, MARK, None)  # no mark: the sequence started without virtual tokens
    rows = rows_of(batch, device)
    _check_pooling(body, rows)
    cache = _prefill_cache(body, inputs, key, cache, rows)
    slots = _slots(rows)
    if cache is not None and slots.width:
        setattr(cache, MARK, slots)
    return past, rows, slots


def _check_pooling(body: nn.Module, rows: RowContributions) -> None:
    """A pooler inside the body (BERT's) reads position 0, which is a padding slot in rows with fewer virtual
    tokens than the batch's longest: refuse rather than pool the wrong position."""
    uneven = rows.virtual is not None and bool((rows.virtual_counts != rows.virtual.shape[1]).any())
    if uneven and getattr(body, "pooler", None) is not None:
        raise DeltatuneError(
            f"{type(body).__name__} pools position 0 inside the body, so rows with different numbers of virtual "
            "tokens cannot share a batch; run them in separate batches (or give them adapters of equal length)"
        )


def _slots(rows: RowContributions) -> VirtualSlots:
    """Cache-order slot mask (prefix slots, then virtual input slots) and per-row shifts."""
    parts = []
    for tensor, counts in ((rows.prefix, rows.prefix_counts), (rows.virtual, rows.virtual_counts)):
        if tensor is not None:
            width = tensor.shape[1]
            parts.append(torch.arange(width, device=counts.device)[None, :] >= (width - counts)[:, None])
    batch = rows.virtual_counts.shape[0]
    mask = torch.cat(parts, dim=1) if parts else torch.ones(batch, 0, dtype=torch.bool,
                                                            device=rows.virtual_counts.device)
    return VirtualSlots(mask, rows.prefix_counts + rows.virtual_counts)


def _virtual_positions(rows: RowContributions) -> Tensor:
    """Positions of the virtual input slots: each row's virtual tokens follow its prefix (padding slots repeat the
    first position, they are masked anyway), so positions never decrease along a row."""
    width = rows.virtual.shape[1]
    offsets = torch.arange(width, device=rows.virtual_counts.device)[None, :] - (width - rows.virtual_counts)[:, None]
    return rows.prefix_counts[:, None] + offsets.clamp(min=0)


def _real_positions(given: Tensor | None, past_real: int, batch: int, length: int, device) -> Tensor:
    """Positions of the real tokens as if no virtual token existed: the caller's, or past + arange."""
    if given is None:
        return (torch.arange(length, device=device) + past_real)[None, :].expand(batch, length)
    if given.ndim != 2:
        raise DeltatuneError(f"prompt-style adapters need 2-D position_ids (batch, length), got shape "
                             f"{tuple(given.shape)}")
    return given.expand(batch, length)


def _full_mask(mask: Tensor | None, slots: VirtualSlots, past: int, length: int) -> Tensor:
    """[virtual slots | the caller's mask over real tokens]: the caller never counts virtual positions."""
    real_length = past - slots.width + length if past else length
    if mask is None:
        mask = torch.ones(slots.mask.shape[0], real_length, dtype=torch.long, device=slots.mask.device)
    elif mask.shape[1] != real_length:
        raise DeltatuneError(
            f"attention_mask covers {mask.shape[1]} positions but this call has {real_length} real tokens (cached and "
            "new); with a prompt-style adapter the mask must not count its virtual tokens"
        )
    return torch.cat([slots.mask.to(mask.dtype), mask], dim=1)


def _extend_token_types(inputs: dict, width: int) -> None:
    types = inputs.get("token_type_ids")
    if types is not None:
        inputs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], width), types], dim=1)


def _prefill_cache(body: nn.Module, inputs: dict, key: str, cache, rows: RowContributions):
    """The cache this sequence uses: the caller's (or a new DynamicCache) holding the rows' prefixes. Created when
    the caller wants a cache (so generate's later calls find the slots) or a prefix needs one."""
    from transformers import DynamicCache

    use_cache = inputs.get("use_cache")
    wants_cache = use_cache if use_cache is not None else bool(getattr(body.config, "use_cache", False))
    if cache is None and not (wants_cache or rows.prefix is not None):
        return None
    if cache is not None and not isinstance(cache, DynamicCache):
        raise DeltatuneError(
            f"prompt-style adapters need a DynamicCache (the transformers default), got {type(cache).__name__}; "
            "do not set a static cache_implementation"
        )
    if cache is None:
        cache = DynamicCache(config=body.config)
        inputs[key] = cache
    if rows.prefix is not None:
        _check_no_checkpointing(body)
        for layer in range(rows.prefix.shape[2]):
            keys = rows.prefix[:, :, layer, 0].transpose(1, 2)  # (B, H, W_pre, hd)
            values = rows.prefix[:, :, layer, 1].transpose(1, 2)
            cache.update(keys, values, layer)
    return cache


def _check_no_checkpointing(body: nn.Module) -> None:
    """transformers drops the cache inside gradient-checkpointed layers, which would silently drop the prefix."""
    if body.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                         for m in body.modules()):
        raise DeltatuneError(
            "prefix tuning cannot train with gradient checkpointing (transformers drops the KV cache, and with it "
            "the prefix, inside checkpointed layers); set gradient_checkpointing: false"
        )


def kv_dtype(body: nn.Module) -> torch.dtype:
    """The dtype the attention layers will produce keys/values in (autocast's, when it is on)."""
    weight = body.get_input_embeddings().weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype
