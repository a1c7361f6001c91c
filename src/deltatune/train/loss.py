"""Losses that never build the full logits tensor.

On a 135M model with a 49k vocabulary, half a plain training step is the LM head and cross-entropy over every
position, and the fp32 logits alone are ~1 GB at batch 8×256. Here the head runs only at positions that carry loss
(completion tokens under prompt masking), in chunks, each chunk recomputed in backward instead of stored: memory is
O(chunk × vocab) and head FLOPs are proportional to the loss tokens, not to the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import DeltatuneError
from .data import IGNORE


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns hidden states) and the output head of a transformers causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise DeltatuneError(f"{type(model).__name__}: cannot split into body and LM head for the chunked loss")
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise DeltatuneError(f"{type(model).__name__} post-processes its logits ({attr}); not supported yet")
    return body, head


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab) in fp32 for a stable log-sum-exp
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int = 512) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of loss tokens) for a batch; divide for the mean."""
    body, head = backbone_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    selected = hidden[:, :-1][keep]  # (N, H): only positions that predict a loss token
    wanted = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk):
        part = (selected[start:start + chunk], wanted[start:start + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, *part, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, *part)
    return total, int(keep.sum())


def classification_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, int]:
    """(sum of losses, rows, correct predictions) for a sequence classifier."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    logits = model(**inputs).logits.float()
    labels = batch["class_labels"]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, labels.numel(), int((logits.argmax(-1) == labels).sum())
