"""Prefix tuning: "Prefix-Tuning: Optimizing Continuous Prompts for Generation", Li & Liang, 2021,
https://arxiv.org/abs/2101.00190

Rule: every attention layer l attends to P extra trainable key/value positions before the real tokens,
attn(q, [K_l^prefix; K_l], [V_l^prefix; V_l]); the model is frozen. The prefixes go into the transformers KV cache
(a `DynamicCache` filled when a call starts a new sequence), so plain calls, training and `generate` all see them;
real tokens' positions start after the prefix (as when the prefix were real tokens).
Parameters (PEFT's layout, with kv = H_kv·hd the key/value width, GQA-aware): flat — the prefix itself,
P × (L·2·kv); `prefix_projection` — the paper's reparameterisation P = MLP(P'), a smaller table P' ∈ R^{P×kv}
through Linear(kv, h) → tanh → Linear(h, L·2·kv) (h = encoder_hidden_size), which the paper found to train more
stably. Init: PyTorch's defaults (as PEFT), or "zero" (zero prefix / zero last projection, PEFT's init_weights).
Even a zero prefix changes the output (it takes attention mass), so the method is never the identity at init.
Files store the flat prefix as `prompt_embeddings` (what PEFT saves and loads) and, when projected, the MLP weights
(what deltatune resumes from). Not mergeable; gradient checkpointing is refused (transformers drops the cache).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor, nn

from ..core.errors import DeltatuneError
from .prompt import PROMPT_FILE_KEY, PromptStyleConfig, from_peft_common, peft_common, register_prompt_method
from .prompt_body import BodyDims


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptStyleConfig):
    """Attributes:
    num_virtual_tokens: P, the prefix length.
    prefix_projection: reparameterise the prefix through an MLP over a smaller table (the paper's P = MLP(P')).
    encoder_hidden_size: h, the MLP's hidden width (default: the key/value width).
    init: "random" (PyTorch defaults) or "zero".
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: Literal["random", "zero"] = "random"

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise DeltatuneError(f"prefix_tuning: encoder_hidden_size must be > 0, got {self.encoder_hidden_size}")

    def make_encoder(self, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> nn.Module:
        if not dims.layers or not dims.kv_heads or not dims.head_dim:
            raise DeltatuneError(f"prefix_tuning: cannot read the layer count and key/value heads of "
                                 f"{type(body).__name__} from its config")
        return PrefixEncoder(self, dims)

    def count(self, dims: BodyDims) -> int:
        if dims.layers is None:
            raise DeltatuneError("prefix_tuning: the parameter count depends on the model's layers and key/value "
                                 "width; attach it and count deltatune.trainable_parameters(model)")
        full = dims.layers * 2 * dims.kv_width
        if not self.prefix_projection:
            return self.num_virtual_tokens * full
        hidden = self.encoder_hidden_size or dims.kv_width
        return self.num_virtual_tokens * dims.kv_width + (dims.kv_width * hidden + hidden) + (hidden * full + full)


class PrefixEncoder(nn.Module):
    """The prefix (flat) or its reparameterisation (PEFT's module names: embedding, transform)."""

    def __init__(self, config: PrefixTuningConfig, dims: BodyDims) -> None:
        super().__init__()
        self.dims = dims
        full = dims.layers * 2 * dims.kv_width
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or dims.kv_width
            self.embedding = nn.Embedding(config.num_virtual_tokens, dims.kv_width)
            self.transform = nn.Sequential(nn.Linear(dims.kv_width, hidden), nn.Tanh(), nn.Linear(hidden, full))
            last = self.transform[-1]
            if config.init == "zero":
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, full)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> Tensor:
        """(P, L·2·kv): per position, layer 0's key and value, then layer 1's, ... (heads major within each)."""
        table = self.embedding.weight
        return self.transform(table) if hasattr(self, "transform") else table

    def prefix(self) -> Tensor:
        d = self.dims
        return self.flat().view(-1, d.layers, 2, d.kv_heads, d.head_dim)  # (P, L, 2, H_kv, hd)

    def virtual_tokens(self) -> None:
        return None

    def token_update(self) -> None:
        return None

    def file_tensors(self) -> dict[str, Tensor]:
        if not hasattr(self, "transform"):
            return {PROMPT_FILE_KEY: self.embedding.weight}
        own = {f"prompt_encoder.{k}": v for k, v in self.state_dict().items()}
        return {PROMPT_FILE_KEY: self.flat(), **own}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        if not hasattr(self, "transform"):
            self.embedding.weight.copy_(tensors[PROMPT_FILE_KEY])
            return
        self.load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in tensors.items() if k != PROMPT_FILE_KEY})


def _to_peft(config: PrefixTuningConfig) -> dict:
    return {**peft_common(config), "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size,
            "init_weights": "zero" if config.init == "zero" else None}


def _from_peft(raw: dict) -> dict:
    fields = from_peft_common("prefix tuning", raw, ("prefix_projection", "encoder_hidden_size", "init_weights"))
    # PEFT saves the flat prefix even for a projected one (the MLP is dropped), so it always loads flat
    return {**fields, "prefix_projection": False, "init": "zero" if raw.get("init_weights") == "zero" else "random"}


PAPER = ("Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021) "
         "https://arxiv.org/abs/2101.00190")
register_prompt_method("prefix_tuning", PrefixTuningConfig, PAPER, ("PREFIX_TUNING", _to_peft, _from_peft))
