"""Optimizer helpers.

`param_groups` implements LoRA+ ("LoRA+: Efficient Low Rank Adaptation of Large Models", Hayou et al., 2024,
https://arxiv.org/abs/2402.12354): the B side of each low-rank update learns `lora_plus_ratio` times faster than the
A side (the paper's λ = η_B / η_A, 16 recommended). Which parameters are "B" is declared by each method
(`Delta.fast_parameters`), so the helper works for any method that has such a side, and is plain grouping otherwise.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.errors import DeltatuneError
from .core.slot import slots_of


def param_groups(
    model: nn.Module, lr: float, lora_plus_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups over the trainable delta parameters.

    Groups: A-side / other matrices at `lr`; B-side (`fast_parameters`) at `lr * lora_plus_ratio`; vectors (biases,
    magnitudes, scales) at `lr` without weight decay. Pass the result to any torch optimizer:
    `torch.optim.AdamW(deltatune.optim.param_groups(model, 2e-4))`. `lora_plus_ratio=1` gives plain LoRA training.
    """
    if lr <= 0 or lora_plus_ratio <= 0:
        raise DeltatuneError(f"lr and lora_plus_ratio must be > 0, got lr={lr}, lora_plus_ratio={lora_plus_ratio}")
    slow, fast, vectors = [], [], []
    for _, _, slot in slots_of(model):
        for delta in slot.values():
            for pname, param in delta.named_parameters():
                if not param.requires_grad:
                    continue
                if pname in delta.fast_parameters:
                    fast.append(param)
                elif param.ndim < 2:
                    vectors.append(param)
                else:
                    slow.append(param)
    if not (slow or fast or vectors):
        raise DeltatuneError("no trainable delta parameters: attach an adapter (or load one with trainable=True) first")
    groups = [
        {"params": slow, "lr": lr, "weight_decay": weight_decay},
        {"params": fast, "lr": lr * lora_plus_ratio, "weight_decay": weight_decay},
        {"params": vectors, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
