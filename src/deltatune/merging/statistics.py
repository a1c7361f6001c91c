"""Per-tensor statistics that data-aware merge methods read: diagonal Fisher (fisher) and input Gram matrices
(regmean), computed from a few batches and saved as safetensors keyed by the weight names of the checkpoint.

    fisher = diagonal_fisher(model, batches)          # {"model.layers.0.mlp.up_proj.weight": F, ...}
    save_statistics(fisher, "math_fisher.safetensors")  # then `statistics: math_fisher.safetensors` in the YAML

- Diagonal (empirical) Fisher: the mean over batches of the squared gradient of the model's loss (the negative
  log-likelihood of the batch's labels) with respect to each parameter — the batch-level approximation of the
  per-example Fisher in Matena & Raffel (2022).
- Gram matrices: for every nn.Linear, XᵀX of its inputs over all tokens, divided by the token count (RegMean's
  statistic; the count scale cancels when every model sees the same number of tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..core.errors import DeltatuneError


def diagonal_fisher(model: nn.Module, batches: Iterable[dict]) -> dict[str, Tensor]:
    """Mean squared gradient of `model(**batch).loss` per parameter; each batch must make the model return a loss
    (for a causal LM: input_ids and labels)."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if loss is None:
                raise DeltatuneError("diagonal_fisher: the model returned no loss; give batches with labels")
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.float().square()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    if count == 0:
        raise DeltatuneError("diagonal_fisher: no batches given")
    return {n: s / count for n, s in sums.items()}


def gram_matrices(model: nn.Module, batches: Iterable[dict]) -> dict[str, Tensor]:
    """Mean XᵀX of the inputs of every nn.Linear, keyed '<module path>.weight'."""
    grams: dict[str, Tensor] = {}
    tokens: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + x.t() @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return record

    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(f"{path}.weight")))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: g / tokens[name] for name, g in grams.items()}


def save_statistics(statistics: dict[str, Tensor], path: str | os.PathLike) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in statistics.items()}, str(path))
