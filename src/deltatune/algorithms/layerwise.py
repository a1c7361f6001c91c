"""Layerwise sampling: train a few randomly chosen layers at a time (memory of a few layers' gradients and states).

- LISA (Pan et al., 2024, https://arxiv.org/abs/2403.17919): every `every` optimizer steps, `layers` of the
  model's numbered layers are drawn uniformly; only their trainable parameters get gradients until the next draw.
  Trainable parameters outside numbered layers (embeddings, the head, a classifier) always train.
- OwLore (Li et al., 2024, https://arxiv.org/abs/2405.18380): the same, with layer ℓ drawn with probability
  proportional to its outlier ratio — the share of base-weight entries with |W_ij| > `threshold`·mean|W| over the
  layer's adapted modules (the paper also weights by activation norms, which needs data; this is the data-free form).
Draws come from (seed, draw index), so a resumed run draws the same layers. The draw for the next steps is made in
`step()`, after the update: parameters of layers that are not drawn have requires_grad switched off, so the forward
pass builds no graph for them and AdamW skips them.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..core.hosts import read_base_weight
from ..core.slot import slots_of
from ..core.targeting import layer_index


def layer_parameters(model: nn.Module) -> tuple[dict[int, list[nn.Parameter]], list[nn.Parameter]]:
    """({layer index: its trainable delta parameters}, the trainable delta parameters outside numbered layers)."""
    by_layer: dict[int, list[nn.Parameter]] = {}
    always = []
    for path, _, slot in slots_of(model):
        index = layer_index(path, None)
        params = [p for delta in slot.values() for p in delta.parameters() if p.requires_grad]
        (always if index is None else by_layer.setdefault(index, [])).extend(params)
    return by_layer, always


def outlier_ratios(model: nn.Module, layers: list[int], threshold: float) -> dict[int, float]:
    """OwLore's layer score: the share of adapted base-weight entries above threshold × the layer's mean |W|."""
    counts: dict[int, list[float]] = {i: [0.0, 0.0] for i in layers}
    for path, module, _ in slots_of(model):
        index = layer_index(path, None)
        if index in counts:
            weight = read_base_weight(module).detach().float().abs()
            counts[index][0] += float((weight > threshold * weight.mean()).sum())
            counts[index][1] += weight.numel()
    return {i: (hits / total if total else 0.0) for i, (hits, total) in counts.items()}


class LayerSampler:
    """Chooses which layers train; `apply(draw)` switches requires_grad accordingly."""

    def __init__(self, model: nn.Module, layers: int, seed: int, weights: dict[int, float] | None = None) -> None:
        self.by_layer, self.always = layer_parameters(model)
        if not self.by_layer:
            raise DeltatuneError("layerwise sampling needs adapted modules inside numbered layers (model.layers.N)")
        if not 1 <= layers <= len(self.by_layer):
            raise DeltatuneError(f"layers must be in 1..{len(self.by_layer)} (the adapted layers), got {layers}")
        self.count, self.seed = layers, seed
        self.indices = sorted(self.by_layer)
        self.weights = [max(weights[i], 1e-12) for i in self.indices] if weights else None

    def chosen(self, draw: int) -> list[int]:
        rng = random.Random(f"{self.seed}:{draw}")
        if self.weights is None:
            return sorted(rng.sample(self.indices, self.count))
        pool, weights, picked = list(self.indices), list(self.weights), []
        for _ in range(self.count):  # weighted sampling without replacement
            i = rng.choices(range(len(pool)), weights=weights)[0]
            picked.append(pool.pop(i))
            weights.pop(i)
        return sorted(picked)

    def apply(self, draw: int) -> list[int]:
        chosen = set(self.chosen(draw))
        for index, params in self.by_layer.items():
            for param in params:
                param.requires_grad_(index in chosen)
                if index not in chosen:
                    param.grad = None
        return sorted(chosen)


class LayerwiseAdamW(torch.optim.AdamW):
    """AdamW over every trainable delta parameter; after each step, the layers for the next steps are drawn."""

    def __init__(self, groups: list[dict], sampler: LayerSampler, every: int, **kwargs) -> None:
        super().__init__(groups, **kwargs)
        self.sampler, self.every = sampler, every
        self.param_groups[0].setdefault("layerwise_step", 0)  # saved with the optimizer, so resume draws the same
        self.active_layers = sampler.apply(self.param_groups[0]["layerwise_step"] // every)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        group = self.param_groups[0]
        group["layerwise_step"] += 1
        if group["layerwise_step"] % self.every == 0:
            self.active_layers = self.sampler.apply(group["layerwise_step"] // self.every)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.active_layers = self.sampler.apply(self.param_groups[0].get("layerwise_step", 0) // self.every)
