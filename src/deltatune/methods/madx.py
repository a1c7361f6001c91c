"""MAD-X invertible adapters: "MAD-X: An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer", Pfeiffer
et al., 2020, https://arxiv.org/abs/2005.00052

A NICE-style additive coupling A on the token embeddings e, and its exact inverse A⁻¹ on the transformer's final
hidden states, just before the (tied) output embedding. With e split into halves e₁ (⌊d/2⌋) and e₂:
    A(e) = [o₁; o₂],     o₁ = e₁ + F(e₂),  o₂ = e₂ + G(o₁);
    A⁻¹([o₁; o₂]) = [e₁; e₂],  e₂ = o₂ − G(o₁),  e₁ = o₁ − F(e₂),
with F, G small bottlenecks x ↦ σ(x·W_downᵀ + b_down)·W_upᵀ + b_up (hidden width = input width / reduction_factor,
AdapterHub's default factor 2). The adapter sits on the transformer body (`model.base_model`, e.g. LlamaModel): it
turns `input_ids` into coupled `inputs_embeds` before the body runs (so models with absolute position embeddings
add them after the coupling) and applies A⁻¹ to the body's output, which the LM head (or deltatune's chunked loss)
then reads. In MAD-X the invertible adapter is part of the *language* adapter: use it with a Pfeiffer adapter of the
same language, and stack the task adapter on top: `deltatune.use(model, Stack("lang_inv", "lang", "task"))`.
Init: "identity" (W_up = 0 in F and G: A is the identity at step 0) or "random" (every weight as nn.Linear).
Parameters: h_F·(d₂ + 1) + d₁·(h_F + 1) + h_G·(d₁ + 1) + d₂·(h_G + 1), h_F = ⌊d₂ / factor⌋, h_G = ⌊d₁ / factor⌋
(at least 1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import MODULE_KIND, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .bottleneck import ACTIVATIONS, Affine, call_arguments, check_bottleneck, model_body


@dataclasses.dataclass(frozen=True, kw_only=True)
class InvertibleAdapterConfig(DeltaConfig):
    """Attributes:
    reduction_factor: input width / hidden width of the coupling functions F and G.
    activation: the non-linearity inside F and G.
    init: "identity" (A = identity at step 0) or "random".
    """

    reduction_factor: float = 2.0
    activation: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        super().validate()
        check_bottleneck(self.method, None, self.reduction_factor)

    def default_targets(self, model):
        return [model_body(model)]


def halves(width: int) -> tuple[int, int]:
    return width // 2, width - width // 2


def hidden(width: int, factor: float) -> int:
    return max(1, int(width // factor))


class Coupling(nn.Module):
    """One coupling function: a bottleneck from `width_in` to `width_out`."""

    def __init__(self, width_in: int, width_out: int, factor: float, init: str) -> None:
        super().__init__()
        self.down = Affine(width_in, hidden(width_in, factor))
        self.up = Affine(hidden(width_in, factor), width_out)
        if init == "identity":
            with torch.no_grad():
                self.up.weight.zero_()
                self.up.bias.zero_()

    def forward(self, x: Tensor, activation) -> Tensor:
        return self.up(activation(self.down(x)))


class InvertibleAdapterDelta(Delta):
    """A on the body's input embeddings (pre_forward), A⁻¹ on its output hidden states (forward)."""

    def __init__(self, config: InvertibleAdapterConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.d1, self.d2 = halves(info.out_features)
        if self.d1 == 0:
            raise DeltatuneError(f"invertible_adapter: {path!r} has width {info.out_features}; need at least 2")
        self.f = Coupling(self.d2, self.d1, config.reduction_factor, config.init)
        self.g = Coupling(self.d1, self.d2, config.reduction_factor, config.init)
        self.act = ACTIVATIONS[config.activation]

    def couple(self, e: Tensor) -> Tensor:
        e1, e2 = e.to(self.f.up.weight.dtype).split([self.d1, self.d2], dim=-1)
        o1 = e1 + self.f(e2, self.act)
        return torch.cat([o1, e2 + self.g(o1, self.act)], dim=-1).to(e.dtype)

    def inverse(self, o: Tensor) -> Tensor:
        o1, o2 = o.to(self.f.up.weight.dtype).split([self.d1, self.d2], dim=-1)
        e2 = o2 - self.g(o1, self.act)
        return torch.cat([o1 - self.f(e2, self.act), e2], dim=-1).to(o.dtype)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return self.inverse(y)

    def pre_forward(self, args: tuple, kwargs: dict, host: Host) -> tuple[tuple, dict]:
        return _with_embeddings(args, kwargs, host, self.couple)

    @classmethod
    def per_row_pre_forward(cls, deltas, slots, args, kwargs, host, cache):
        return _with_embeddings(args, kwargs, host, lambda e: _by_rows(deltas, slots, e, "couple"))

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        return _by_rows(deltas, slots, y, "inverse")

    @classmethod
    def num_parameters(cls, config: InvertibleAdapterConfig, info: HostInfo, path: str) -> int:
        d1, d2 = halves(info.out_features)
        h_f, h_g = hidden(d2, config.reduction_factor), hidden(d1, config.reduction_factor)
        return h_f * (d2 + 1) + d1 * (h_f + 1) + h_g * (d1 + 1) + d2 * (h_g + 1)

    @classmethod
    def identity_for(cls, config: InvertibleAdapterConfig) -> bool:
        return config.init == "identity"


def _by_rows(deltas: list[InvertibleAdapterDelta], slots: Tensor, h: Tensor, which: str) -> Tensor:
    """Row i through deltas[slots[i]].<which> (unchanged where slots[i] < 0)."""
    out = h
    for k, delta in enumerate(deltas):
        rows = (slots == k).nonzero().squeeze(1)
        if rows.numel():
            out = out.index_copy(0, rows, getattr(delta, which)(h.index_select(0, rows)))
    return out


def _with_embeddings(args: tuple, kwargs: dict, host: Host, change) -> tuple[tuple, dict]:
    """The body's call, all by keyword, with `input_ids` replaced by change(embeddings) as `inputs_embeds` (first, so
    that the slot reads the batch size from it)."""
    given = call_arguments(host.module, args, kwargs)
    ids, embeds = given.pop("input_ids", None), given.pop("inputs_embeds", None)
    if embeds is None:
        embed = getattr(host.module, "get_input_embeddings", None)
        if ids is None or embed is None:
            raise DeltatuneError(f"invertible_adapter at {host.slot.path!r} needs a transformer body called with "
                                 "input_ids or inputs_embeds; target the model's base_model")
        embeds = embed()(ids)
    return (), {"inputs_embeds": change(embeds), **given}


PAPER = ("MAD-X: An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer (Pfeiffer et al., 2020) "
         "https://arxiv.org/abs/2005.00052")
register_method("invertible_adapter", config=InvertibleAdapterConfig, family="bottleneck", paper=PAPER,
                hosts=(MODULE_KIND,))(InvertibleAdapterDelta)
