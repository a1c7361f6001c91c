"""X-LoRA: "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language Models with
Applications in Protein Mechanics and Molecular Design", Buehler & Buehler, 2024, https://arxiv.org/abs/2402.07148

Learned per-token, per-layer scalings over *already trained* adapters (the experts, attached to the model under their
own names). Every forward runs the model body twice:
1. a scaling pass (no gradients) in which every expert is weighted by the constant `scaling_pass_value` (0: the base
   model), giving the last hidden states h (B, T, H);
2. a small classifier (`depth` linear layers, ReLU and dropout between them) maps h to scalings λ (B, T, L, E) for
   the L adapted layers and E experts — softmax over the experts (temperature τ) unless disabled; without
   `layerwise_scalings` one set of E values is shared by every layer;
3. the real pass, in which layer l adds   Σₑ g·λ[b, t, l, e]·Δₑ(x)   where Δₑ(x) is what expert e adds on that layer
   (its output minus the layer's) and g = `global_scaling_weight`. `top_k` keeps each token's k largest scalings
   (`softmax_topk` then renormalises them with a softmax), as PEFT.
The experts stay what they are (any per-layer method; they train only if their own parameters are trainable); only
the classifier is this adapter's. Placement: the experts' layers plus the model body (`model.base_model`), where the
scaling pass runs; `targets=None` picks exactly those. Parameters: the classifier only (adapter-wide, on disk
`deltatune_shared.layers.*`). The classifier is nn.Linear-initialised, so the mixture is not the identity at init.
Not mergeable. Mixed batches: gathered (each expert runs once over the batch; every row is weighted by its own
adapter's scalings). Generation recomputes the whole sequence each step: call generate(..., use_cache=False).
Inspection: `last_routing` on every layer (its λ slice), `scalings(model, name)` for the whole (B, T, L, E) tensor.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, MODULE_KIND, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from ..core.api import shared_of
from .mixture import Dense, check_counts, check_expert_names, check_library, expert_update, library_experts, \
    library_targets, record_routing


@dataclasses.dataclass(frozen=True, kw_only=True)
class XLoraConfig(DeltaConfig):
    """Attributes:
    experts: names of the attached adapters to mix (their order fixes the classifier's outputs).
    depth: linear layers of the classifier (PEFT's xlora_depth).
    hidden: width of the classifier's hidden layers, when depth > 1 (xlora_size).
    dropout: dropout after each hidden layer of the classifier, when depth > 1 (xlora_dropout_p).
    layerwise_scalings: one set of scalings per adapted layer; False shares one set across layers.
    softmax: softmax over the experts (enable_softmax); temperature τ below.
    softmax_topk: renormalise the top_k kept scalings with a softmax (enable_softmax_topk).
    temperature: τ of the softmax (softmax_temperature).
    top_k: keep each token's k largest scalings (top_k_lora); None keeps all.
    scaling_pass_value: the weight of every expert during the scaling pass.
    global_scaling_weight: g, a factor on every expert's contribution.
    """

    experts: list[str] = dataclasses.field(default_factory=list)
    depth: int = 1
    hidden: int = 2048
    dropout: float = 0.2
    layerwise_scalings: bool = False
    softmax: bool = True
    softmax_topk: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_expert_names(self.method, self.experts)
        check_counts(self.method, depth=self.depth, hidden=self.hidden,
                     **({} if self.top_k is None else {"top_k": self.top_k}))
        if self.top_k is not None and self.experts and self.top_k > len(self.experts):
            raise DeltatuneError(f"xlora: top_k={self.top_k} exceeds the {len(self.experts)} experts; lower top_k")
        if not 0.0 <= self.dropout < 1.0 or self.temperature <= 0:
            raise DeltatuneError(f"xlora: dropout must be in [0, 1) and temperature > 0, got {self.dropout}, "
                                 f"{self.temperature}")

    def default_targets(self, model: nn.Module) -> str:
        return library_targets(model, self.method, self.experts, extra=(body_path(model),))


def body_path(model: nn.Module) -> str:
    """Path of the transformer body (`model.base_model`), where X-LoRA runs its scaling pass."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise DeltatuneError(f"xlora: {type(model).__name__} has no separate body (model.base_model) to run the "
                             "scaling pass on; give targets = the experts' modules plus the module whose output is "
                             "the last hidden states")
    return next(p for p, m in model.named_modules() if m is body)


class XLoraClassifier(nn.Module):
    """The adapter-wide classifier: last hidden states (B, T, H) -> scalings (B, T, L, E); also the pass state."""

    def __init__(self, config: XLoraConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        bodies = [p for p, info in hosts.items() if info.kind == MODULE_KIND]
        layers = [p for p, info in hosts.items() if info.kind != MODULE_KIND]
        if len(bodies) != 1 or not layers:
            raise DeltatuneError(f"xlora: targets must hold exactly one model body and the experts' layers, got "
                                 f"bodies {bodies} and {len(layers)} layers; leave targets unset to pick them")
        self.config, self.layer_index = config, {p: i for i, p in enumerate(layers)}
        experts, width = len(config.experts), hosts[bodies[0]].out_features
        out = experts * (len(layers) if config.layerwise_scalings else 1)
        stack: list[nn.Module] = []
        for _ in range(config.depth - 1):
            stack += [Dense(width, config.hidden), nn.ReLU()]
            stack += [nn.Dropout(config.dropout)] if config.dropout > 0 else []
            width = config.hidden
        self.layers = nn.Sequential(*stack, Dense(width, out))
        self.scaling_pass = False
        self.scalings: Tensor | None = None  # (B, T, L, E) of the current forward

    def set_scalings(self, hidden: Tensor) -> None:
        logits = self.layers(hidden.to(self.layers[-1].weight.dtype))  # (B, T, E·L) or (B, T, E)
        batch, tokens, layers, experts = *hidden.shape[:2], len(self.layer_index), len(self.config.experts)
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, layers, -1)
        scalings = logits.reshape(batch, tokens, layers, experts)
        if self.config.softmax:
            scalings = torch.softmax(scalings / self.config.temperature, dim=-1)
        self.scalings = scalings


CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.2x names it `cache`; older versions past_key_values


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else len(cache)


def _scaling_pass(module: nn.Module, args: tuple, kwargs: dict, classifiers: list[XLoraClassifier]) -> Tensor:
    """Run the body once with every expert at the scaling-pass value; its last hidden states."""
    if any(_cache_length(kwargs.get(key)) > 0 for key in CACHE_KWARGS):
        raise DeltatuneError("xlora recomputes the whole sequence to score its experts and cannot continue from a KV "
                             "cache; call generate(..., use_cache=False)")
    run_kwargs = {**kwargs, "use_cache": False, **{key: None for key in CACHE_KWARGS if key in kwargs}}
    for classifier in classifiers:
        classifier.scaling_pass = True
    try:
        with torch.no_grad():
            out = module(*args, **run_kwargs)
    finally:
        for classifier in classifiers:
            classifier.scaling_pass = False
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class XLoraDelta(Delta):
    """On the body: runs the scaling pass and the classifier. On an expert layer: mixes the experts' updates."""

    identity_at_init = False

    def setup(self, host: Host) -> None:
        self.shared.train(self.training)  # attach sets the mode of the deltas, not of the adapter-wide module
        if self.info.kind != MODULE_KIND:
            check_library(self, host)

    # ---- the body: scaling pass, then scalings --------------------------------------------------------------------
    def pre_forward(self, args: tuple, kwargs: dict, host: Host) -> tuple[tuple, dict]:
        if self.info.kind == MODULE_KIND and not self.shared.scaling_pass:
            self.shared.set_scalings(_scaling_pass(host.module, args, kwargs, [self.shared]))
        return args, kwargs

    @classmethod
    def per_row_pre_forward(cls, deltas, slots, args, kwargs, host, cache):
        routed = [deltas[k] for k in slots.unique().tolist() if k >= 0]
        if host.info.kind != MODULE_KIND or any(d.shared.scaling_pass for d in routed):
            return args, kwargs
        hidden = _scaling_pass(host.module, args, kwargs, [d.shared for d in routed])
        for delta in routed:
            delta.shared.set_scalings(hidden)
        return args, kwargs

    # ---- an expert layer --------------------------------------------------------------------------------------------
    def layer_scalings(self, x: Tensor) -> Tensor:
        """(B, T, E) weights of the experts on this layer for the current call (PEFT's top-k rules applied)."""
        config, classifier = self.config, self.shared
        if classifier.scaling_pass:
            scalings = torch.full((*x.shape[:2], len(config.experts)), config.scaling_pass_value,
                                  device=x.device, dtype=classifier.layers[-1].weight.dtype)
        else:
            if classifier.scalings is None or classifier.scalings.shape[:2] != x.shape[:2]:
                raise DeltatuneError(f"xlora: no scalings for a batch of shape {tuple(x.shape[:2])} at {self.path!r}; "
                                     "X-LoRA scores tokens when the model body runs, so call the whole model (it "
                                     "cannot sit inside BatchSplit / Split)")
            scalings = classifier.scalings[:, :, classifier.layer_index[self.path]]
        if config.top_k is not None:
            kept = scalings.topk(config.top_k, dim=-1).indices
            scalings = scalings * torch.zeros_like(scalings).scatter(-1, kept, 1.0)
        if config.softmax_topk:
            scalings = torch.softmax(scalings.masked_fill(scalings == 0, float("-inf")), dim=-1).nan_to_num(0.0)
        if not classifier.scaling_pass:
            record_routing(self, scalings)
        return scalings * config.global_scaling_weight

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind == MODULE_KIND:
            return y
        scalings = self.layer_scalings(x)
        out = y
        for index, expert in library_experts(self, host):
            out = out + scalings[..., index : index + 1].to(y.dtype) * expert_update(expert, x, y, host)
        return out

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        """Each expert once over the whole batch; row b weighted by its own adapter's scalings (0 without one)."""
        if host.info.kind == MODULE_KIND:
            return y
        names = list(dict.fromkeys(n for d in deltas for n in d.config.experts))
        weights = x.new_zeros((*x.shape[:2], len(names)), dtype=y.dtype)
        experts: dict[str, Delta] = {}
        for k, delta in enumerate(deltas):
            rows = (slots == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            scalings = delta.layer_scalings(x).index_select(0, rows).to(y.dtype)
            for index, expert in library_experts(delta, host):
                column = names.index(delta.config.experts[index])
                weights[rows, :, column] = scalings[..., index]
                experts[names[column]] = expert
        out = y
        for name, expert in experts.items():
            out = out + weights[..., names.index(name)].unsqueeze(-1) * expert_update(expert, x, y, host)
        return out

    @classmethod
    def num_parameters(cls, config: XLoraConfig, info: HostInfo, path: str) -> int:
        return 0

    @classmethod
    def make_shared(cls, config: XLoraConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        return XLoraClassifier(config, hosts)

    @classmethod
    def num_shared_parameters(cls, config: XLoraConfig, hosts: dict[str, HostInfo]) -> int:
        width = next(info.out_features for info in hosts.values() if info.kind == MODULE_KIND)
        layers = sum(info.kind != MODULE_KIND for info in hosts.values())
        out = len(config.experts) * (layers if config.layerwise_scalings else 1)
        if config.depth == 1:
            return width * out + out
        h = config.hidden
        return (width * h + h) + (config.depth - 2) * (h * h + h) + (h * out + out)


def scalings(model: nn.Module, name: str) -> Tensor | None:
    """The scalings (B, T, L, E) X-LoRA adapter `name` computed in the last forward (PEFT's get_latest_scalings)."""
    classifier = shared_of(model, name)
    if not isinstance(classifier, XLoraClassifier):
        raise DeltatuneError(f"adapter {name!r} is not an X-LoRA adapter")
    return None if classifier.scalings is None else classifier.scalings.detach()


PAPER = ("X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language Models with "
         "Applications in Protein Mechanics and Molecular Design (Buehler & Buehler, 2024) "
         "https://arxiv.org/abs/2402.07148")
register_method("xlora", config=XLoraConfig, family="mixture", paper=PAPER,
                hosts=(*LINEAR_KINDS, "embedding", MODULE_KIND))(XLoraDelta)
