"""Prompt tuning, and the delta every prompt-style method (P-tuning, prefix tuning, DePT) shares.

Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning", Lester et al., 2021,
https://arxiv.org/abs/2104.08691

Rule: P trainable virtual token embeddings E_v ∈ R^{P×d} are prepended to the input token embeddings,
[E_v; E(x)], and the frozen model runs on the longer sequence; only E_v trains (P·d parameters).
Init (`init`): "vocab" — embeddings of P tokens drawn at random from the vocabulary (the paper's sampled-vocab init,
PEFT's SAMPLE_VOCAB); "random" — uniform in [−0.5, 0.5] (the paper's random-uniform init); "text" — the embeddings
of `init_text`'s tokens, cut or repeated to P (PEFT's TEXT), with the tokenizer in `tokenizer` or else the model's
own directory (needed wherever the adapter is attached or loaded, as loading attaches first).

Every prompt-style method is a `PromptStyleDelta` on the model body; what differs is its `prompt_encoder` module,
which provides any of: virtual input tokens (P, d), key/value prefixes (P, L, 2, H_kv, hd), and a per-position
update of the real tokens' embeddings (M, d). One delta class for all of them lets a mixed batch route rows to
different prompt-style methods in one pass. The input rewriting (masks, positions, KV cache, mixed batches) is in
`prompt_body.py`. Not mergeable (delta_weight is None); not the identity at init (the virtual tokens are seen).
Compositions: a prompt-style adapter may sit in a `Stack` (with deltas elsewhere in the model) and in mixed
batches (`per_sample`); one prompt-style adapter is active at a time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.compose import Block, Stack
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import MODULE_KIND, HostInfo, placement_of
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import refuse_unknown_peft_fields
from .prompt_body import BodyDims, RowContributions, body_dims, kv_dtype, rewrite_inputs

PROMPT_FILE_KEY = "prompt_embeddings"  # PEFT's one tensor for every prompt-learning method
PEFT_SHAPE_FIELDS = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                     "tokenizer_kwargs")  # filled from the model by PEFT; checked here through the tensor shapes


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptStyleConfig(DeltaConfig):
    """Fields shared by prompt-style methods. `targets` defaults to the model body (`model.base_model`).

    Attributes:
        num_virtual_tokens: P, the number of virtual tokens (or prefix positions).
    """

    num_virtual_tokens: int = 20

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens <= 0:
            raise DeltatuneError(f"{self.method}: num_virtual_tokens must be > 0, got {self.num_virtual_tokens}")

    def default_targets(self, model: nn.Module) -> str:
        body = getattr(model, "base_model", None)
        if body is None or body is model:
            raise DeltatuneError(
                f"{self.method}: {type(model).__name__} has no separate transformer body (`base_model`); attach to "
                "a model with a head (e.g. LlamaForCausalLM) or name the body in targets"
            )
        return re.escape(next(p for p, m in model.named_modules() if m is body))

    def make_encoder(self, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> nn.Module:
        raise NotImplementedError

    def count(self, dims: BodyDims) -> int:
        """The method's parameter count on a body of these dimensions."""
        raise NotImplementedError


class PromptStyleDelta(Delta):
    """A prompt-style method on a model body: rewrites the body's inputs (pre_forward) and strips the virtual
    positions from its output (forward). The method's parameters live in `prompt_encoder`, built in `setup` where
    the body's dimensions and word embeddings are known."""

    identity_at_init = False
    peft_bare_keys = (PROMPT_FILE_KEY,)  # PEFT writes it with no module path (used once io knows the attribute)

    def __init__(self, config: PromptStyleConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.strip = 0  # virtual input positions to drop from this call's output (set by pre_forward)

    def setup(self, host: Host) -> None:
        body = host.module
        dims = body_dims(body, self.path, self.config.method)
        device, dtype = placement_of(body)
        encoder = self.config.make_encoder(dims, body.get_input_embeddings(), body)
        self.prompt_encoder = encoder.to(device=device, dtype=dtype)
        self.prompt_encoder.train(self.training)
        # instance attribute: which parameters the optimizer's "fast" group gets depends on the method
        self.fast_parameters = tuple(f"prompt_encoder.{n}" for n in getattr(encoder, "fast", ()))

    # ---- the contract -----------------------------------------------------------------------------------------
    def pre_forward(self, args: tuple, kwargs: dict, host: Host) -> tuple[tuple, dict]:
        check_routing(self, host)
        slots = torch.zeros(1, dtype=torch.long)
        kwargs, self.strip = _rewrite([self], slots, args, kwargs, host)
        return (), kwargs

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return y[:, self.strip:] if self.strip else y

    @classmethod
    def per_row_pre_forward(cls, deltas, slots, args, kwargs, host, cache):
        kwargs, cache["strip"] = _rewrite(deltas, slots, args, kwargs, host)
        return (), kwargs

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        strip = cache.get("strip", 0)
        return y[:, strip:] if strip else y

    @classmethod
    def num_parameters(cls, config: PromptStyleConfig, info: HostInfo, path: str) -> int:
        return config.count(BodyDims(info.out_features))

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.prompt_encoder.file_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        with torch.no_grad():
            self.prompt_encoder.load_file_tensors(tensors)


def _rewrite(deltas: list[PromptStyleDelta], slots: Tensor, args: tuple, kwargs: dict, host: Host):
    """rewrite_inputs with row i drawing from deltas[slots[i]] (none where slots[i] < 0); a single-adapter call is
    a batch whose rows all use delta 0 (slots of length 1 broadcast to every row)."""
    body = host.module

    def row_slots(batch: int, device) -> Tensor:
        return (slots.expand(batch) if slots.numel() == 1 else slots).to(device)

    def rows_of(batch: int, device) -> RowContributions:
        return _row_contributions(deltas, row_slots(batch, device), kv_dtype(body))

    def token_update_of(positions: Tensor, dtype: torch.dtype) -> Tensor | None:
        return _token_update(deltas, row_slots(positions.shape[0], positions.device), positions, dtype)

    return rewrite_inputs(body, args, kwargs, rows_of, token_update_of)


def _left_padded(tables: dict[int, Tensor | None], slots: Tensor) -> tuple[Tensor | None, Tensor]:
    """Per-row tables (row i gets tables[slots[i]]), each left-padded with zeros to the longest; and row counts."""
    lengths = {k: (0 if t is None else t.shape[0]) for k, t in tables.items()}
    counts = torch.tensor([lengths.get(k, 0) for k in slots.tolist()], dtype=torch.long, device=slots.device)
    width = max(lengths.values(), default=0)
    if width == 0:
        return None, counts
    sample = next(t for t in tables.values() if t is not None)
    order = {k: i for i, k in enumerate(tables)}
    padded = [sample.new_zeros(width, *sample.shape[1:]) if t is None else
              torch.cat([t.new_zeros(width - t.shape[0], *t.shape[1:]), t]) for t in tables.values()]
    padded.append(sample.new_zeros(width, *sample.shape[1:]))  # rows with no prompt-style delta
    index = torch.tensor([order.get(k, len(tables)) for k in slots.tolist()], device=slots.device)
    return torch.stack(padded).index_select(0, index), counts


def _row_contributions(deltas: list[PromptStyleDelta], slots: Tensor, prefix_dtype: torch.dtype) -> RowContributions:
    routed = sorted({k for k in slots.tolist() if k >= 0})
    encoders = {k: deltas[k].prompt_encoder for k in routed}
    virtual, virtual_counts = _left_padded({k: e.virtual_tokens() for k, e in encoders.items()}, slots)
    prefixes = {k: e.prefix() for k, e in encoders.items()}
    prefix, prefix_counts = _left_padded({k: None if p is None else p.to(prefix_dtype) for k, p in prefixes.items()},
                                         slots)
    return RowContributions(virtual, virtual_counts, prefix, prefix_counts)


def _token_update(deltas: list[PromptStyleDelta], slots: Tensor, positions: Tensor, dtype: torch.dtype):
    """(B, T, d) update of the real tokens' embeddings at their positions (DePT), or None when no row has one.
    A table of M rows covers positions 0..M-1; later positions get no update."""
    tables = {k: deltas[k].prompt_encoder.token_update() for k in sorted({k for k in slots.tolist() if k >= 0})}
    tables = {k: t for k, t in tables.items() if t is not None}
    if not tables:
        return None
    width = next(iter(tables.values())).shape[1]
    out = torch.zeros(*positions.shape, width, dtype=dtype, device=positions.device)
    for k, table in tables.items():
        rows = (slots == k).nonzero().squeeze(1)
        where = positions.index_select(0, rows).clamp(min=0)
        inside = (where < table.shape[0]).unsqueeze(-1)
        picked = table.to(dtype)[where.clamp(max=table.shape[0] - 1)] * inside
        out = out.index_copy(0, rows, picked)
    return out


def check_routing(delta: PromptStyleDelta, host: Host) -> None:
    """One prompt-style adapter at a time on a body, reached only through Stack blocks: the others (Average, Split,
    BatchSplit, Fuse) combine outputs position by position, which virtual positions would shift."""
    slot, state = host.slot, host.slot.state
    names = state.block.names() if state.block is not None else state.active
    mine = [n for n in names if isinstance(slot._modules.get(n), PromptStyleDelta) and n not in slot.merged_names]
    if len(set(mine)) > 1:
        raise DeltatuneError(f"only one prompt-style adapter can be active at a time on {slot.path!r}, got {mine}; "
                             "use per_sample to give rows different ones")
    if state.block is not None and not _stack_only(state.block, set(mine)):
        raise DeltatuneError(
            f"prompt-style adapter {mine[0]!r} can only be composed with Stack; for rows with different adapters "
            "use deltatune.per_sample"
        )


def _stack_only(node, names: set[str]) -> bool:
    """Whether every block on the way from the root to one of `names` is a Stack."""
    if not isinstance(node, Block) or not names & set(node.names()):
        return True
    return isinstance(node, Stack) and all(_stack_only(child, names) for child in node.children)


# ---- initialisation shared by prompt tuning and DePT -------------------------------------------------------------
InitKind = Literal["vocab", "random", "text"]


def check_init(config, init: str, init_text: str | None) -> None:
    if (init == "text") != (init_text is not None):
        raise DeltatuneError(f"{config.method}: init_text is needed with init='text' and only then; got init="
                             f"{init!r}, init_text={init_text!r}")
    if init_text is not None and not init_text.strip():
        raise DeltatuneError(f"{config.method}: init_text is empty; give the words the prompt should start as")


class VirtualTokenTable(nn.Module):
    """P trainable token embeddings (`embedding.weight`, PEFT's name) with the prompt-tuning inits."""

    def __init__(self, config, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> None:
        super().__init__()
        count = config.num_virtual_tokens
        self.embedding = nn.Embedding(count, dims.hidden)
        words = word_embeddings.weight
        with torch.no_grad():
            if config.init == "random":
                self.embedding.weight.uniform_(-0.5, 0.5)
                return
            if config.init == "vocab":
                ids = torch.randint(0, word_embeddings.num_embeddings, (count,)).tolist()
            else:
                tokenizer = config.tokenizer or getattr(body.config, "_name_or_path", "") or ""
                ids = text_token_ids(config.init_text, tokenizer, count)
            self.embedding.weight.copy_(words[torch.tensor(ids, device=words.device)])


def text_token_ids(text: str, tokenizer_path: str, count: int) -> list[int]:
    """The tokens of `text` (as the tokenizer encodes it, special tokens included, like PEFT), cut or repeated to
    `count`."""
    if not tokenizer_path:
        raise DeltatuneError("init='text' needs a tokenizer: set tokenizer=<directory> in the config (the model "
                             "records no path to load one from)")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    # transformers raises OSError / ValueError / HF errors for a missing tokenizer
    except Exception as err:  # noqa: BLE001
        raise DeltatuneError(f"init='text': cannot load a tokenizer from {tokenizer_path!r} ({err}); set tokenizer="
                             "<directory with tokenizer files>") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise DeltatuneError(f"init_text {text!r} tokenizes to nothing")
    return (ids * math.ceil(count / len(ids)))[:count]


# ---- prompt tuning -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptStyleConfig):
    """Attributes:
    num_virtual_tokens: P, the number of virtual tokens.
    init: "vocab" (embeddings of random vocabulary tokens), "random" (uniform ±0.5) or "text" (init_text's tokens).
    init_text: the text whose token embeddings start the prompt (with init="text").
    tokenizer: tokenizer directory for init="text" (default: the model's own directory).
    """

    init: InitKind = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        super().validate()
        check_init(self, self.init, self.init_text)

    def make_encoder(self, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> nn.Module:
        return PromptTable(self, dims, word_embeddings, body)

    def count(self, dims: BodyDims) -> int:
        return self.num_virtual_tokens * dims.hidden


class PromptTable(VirtualTokenTable):
    """Prompt tuning's encoder: the virtual tokens are the table itself."""

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight

    def prefix(self) -> None:
        return None

    def token_update(self) -> None:
        return None

    def file_tensors(self) -> dict[str, Tensor]:
        return {PROMPT_FILE_KEY: self.embedding.weight}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.embedding.weight.copy_(tensors[PROMPT_FILE_KEY])


# ---- PEFT config mapping shared by the prompt-learning types ------------------------------------------------------
def peft_common(config: PromptStyleConfig) -> dict:
    """PEFT's PromptLearningConfig fields; the model-shape ones stay None so PEFT fills them from the model."""
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_virtual_tokens,
            "num_transformer_submodules": 1, "token_dim": None, "num_layers": None, "num_attention_heads": None}


def from_peft_common(title: str, raw: dict, known: tuple[str, ...]) -> dict:
    refuse_unknown_peft_fields(title, raw, (*known, *PEFT_SHAPE_FIELDS, "num_virtual_tokens"))
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise DeltatuneError(f"PEFT {title} with num_transformer_submodules={raw['num_transformer_submodules']} "
                             "(an encoder-decoder model) is not supported; deltatune adapts decoder bodies")
    return {"num_virtual_tokens": raw.get("num_virtual_tokens") or 20}


def _prompt_tuning_to_peft(config: PromptTuningConfig) -> dict:
    # PEFT's TEXT init needs a tokenizer path, which a config using the model's own tokenizer does not hold
    text = config.init == "text" and config.tokenizer is not None
    init = "TEXT" if text else "RANDOM" if config.init == "random" else "SAMPLE_VOCAB"
    return {**peft_common(config), "prompt_tuning_init": init, "prompt_tuning_init_text": config.init_text if text
            else None, "tokenizer_name_or_path": config.tokenizer if text else None}


def _prompt_tuning_from_peft(raw: dict) -> dict:
    fields = from_peft_common("prompt tuning", raw, ("prompt_tuning_init", "prompt_tuning_init_text",
                                                     "tokenizer_name_or_path"))
    # the init only matters when an adapter is created; a TEXT init would need PEFT's tokenizer (often a hub id)
    return {**fields, "init": "random" if raw.get("prompt_tuning_init") in (None, "RANDOM") else "vocab"}


PAPER = ("The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021) "
         "https://arxiv.org/abs/2104.08691")


def register_prompt_method(name: str, config: type[PromptStyleConfig], paper: str, peft: tuple | None = None) -> None:
    """Register a prompt-style method: its config, run by the shared delta on model bodies. `peft`: (peft_type,
    to_peft, from_peft) when PEFT has the method (each PEFT type belongs to exactly one of them)."""
    peft_format = None if peft is None else PeftFormat(*peft, claims=lambda raw: True)
    register_method(name, config=config, family="prompt", paper=paper, hosts=(MODULE_KIND,), peft=peft_format)(
        PromptStyleDelta)


register_prompt_method("prompt_tuning", PromptTuningConfig, PAPER,
                       ("PROMPT_TUNING", _prompt_tuning_to_peft, _prompt_tuning_from_peft))
