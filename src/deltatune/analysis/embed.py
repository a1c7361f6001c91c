"""Sentence embeddings for store search and description routing: the embedded all-MiniLM-L6-v2, offline.

Mean pooling over the attention mask, then L2 normalisation (the recipe all-MiniLM-L6-v2 was trained for), so a dot
product is a cosine similarity. The model loads on first use (about a second) and is cached per process. Any
callable `list[str] -> Tensor (n, dim)` with unit rows can stand in for it (the store records which one it used).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

MINILM = "minilm-l6"


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ..train.models import model_directory

    transformers_logging.disable_progress_bar()  # a store command prints its result, not a loading bar
    directory = model_directory(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    return tokenizer, model


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions, unit length)."""

    name = f"{MINILM}/mean-pooling"

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        tokenizer, model = _minilm()
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state  # (n, tokens, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)
