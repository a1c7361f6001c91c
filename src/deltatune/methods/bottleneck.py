"""Bottleneck adapters: Houlsby, Pfeiffer, parallel and scaled parallel; and where adapters sit on a transformer.

- Houlsby: "Parameter-Efficient Transfer Learning for NLP", Houlsby et al., 2019, https://arxiv.org/abs/1902.00751
- Pfeiffer: "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", Pfeiffer et al., 2021,
  https://arxiv.org/abs/2005.00247 (the single adapter after the feed-forward block)
- Parallel / scaled parallel: "Towards a Unified View of Parameter-Efficient Transfer Learning", He et al., 2022,
  https://arxiv.org/abs/2110.04366

Update rule, with f(h) = s·(σ(h·W_downᵀ + b_down)·W_upᵀ + b_up), W_down (r, d), W_up (d, r):
- sequential (Houlsby, Pfeiffer): the sublayer's output h becomes h + f(h);
- parallel: the sublayer's output becomes h + f(x), x the sublayer's *input*.
Houlsby puts one adapter after the attention and one after the feed-forward block ("both"), Pfeiffer one after the
feed-forward block ("ffn"); the parallel adapter sits beside the feed-forward block (He et al.'s best placement),
scaled by s = 4 in the scaled variant. r = d // reduction_factor unless r is given.
Init: "identity" (W_down as nn.Linear, W_up = 0, biases 0: the model is unchanged at step 0) or "houlsby" (both
weights ~ N(0, 10⁻²) truncated at 2σ, the paper's near-identity init).

Placement (`targets=None`) is found from the module structure: a sequential adapter sits on the sublayer's output
projection (Llama `self_attn.o_proj` / `mlp.down_proj`, GPT-2 `attn.c_proj` / `mlp.c_proj`, BERT
`attention.output.dense` / `output.dense`), a parallel adapter on the block itself (Llama / GPT-2 `self_attn`/`attn`
and `mlp`). BERT's post-norm blocks add their residual inside `BertSelfOutput` / `BertOutput`: there the parallel
adapter reads the residual input `input_tensor` (the sublayer's input) and adds f(x) to it before the LayerNorm,
which equals adding it to the sublayer's output. Any module can be named by hand with `targets`.
Mixed batches: each row's projections are gathered from per-adapter stacks and applied with two bmm.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import MODULE_KIND, HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import gather_rows, kaiming_

Placement = Literal["attention", "ffn", "both"]


# ---- placement: where adapters go, from the module structure ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
    """Module-path patterns (after a layer index) of one architecture family's sublayers."""

    name: str
    attention_output: str  # the attention's output projection (sequential adapters)
    ffn_output: str  # the feed-forward block's output projection
    attention_block: str  # the module whose input and output a parallel adapter connects
    ffn_block: str


ARCHITECTURES = (
    Architecture("llama-like", r"self_attn\.o_proj", r"mlp\.down_proj", r"self_attn", r"mlp"),
    Architecture("gpt2", r"attn\.c_proj", r"mlp\.c_proj", r"attn", r"mlp"),
    Architecture("bert-family", r"attention\.output\.dense", r"output\.dense", r"attention\.output", r"output"),
    Architecture("distilbert", r"attention\.out_lin", r"ffn\.lin2", r"attention", r"ffn"),
)


def _paths_after_layer_index(model: nn.Module, suffix: str) -> list[str]:
    pattern = re.compile(rf"(?:.*\.)?\d+\.{suffix}")
    return [p for p, _ in model.named_modules() if pattern.fullmatch(p) and ".deltatune." not in f".{p}."]


def architecture_of(model: nn.Module) -> Architecture:
    """The first known architecture whose attention and feed-forward outputs the model has, or one clear error."""
    for arch in ARCHITECTURES:
        if _paths_after_layer_index(model, arch.attention_output) and _paths_after_layer_index(model, arch.ffn_output):
            return arch
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise DeltatuneError(
        f"cannot find the attention / feed-forward outputs of {type(model).__name__} (known: {known}); pass "
        "targets=[...] naming the modules the adapter should sit on"
    )


def sublayer_outputs(model: nn.Module, placement: Placement) -> list[str]:
    """Output projections of the attention and/or feed-forward sublayers (sequential adapters)."""
    arch = architecture_of(model)
    wanted = {"attention": [arch.attention_output], "ffn": [arch.ffn_output]}.get(
        placement, [arch.attention_output, arch.ffn_output])
    return sorted(p for suffix in wanted for p in _paths_after_layer_index(model, suffix))


def sublayer_blocks(model: nn.Module, placement: Placement) -> list[str]:
    """The attention and/or feed-forward blocks themselves (parallel adapters)."""
    arch = architecture_of(model)
    wanted = {"attention": [arch.attention_block], "ffn": [arch.ffn_block]}.get(
        placement, [arch.attention_block, arch.ffn_block])
    return sorted(p for suffix in wanted for p in _paths_after_layer_index(model, suffix))


def decoder_layers(model: nn.Module) -> list[str]:
    """The transformer layers: children of the model's layer list (Llama `layers`, GPT-2 `h`, BERT `layer`)."""
    lists = [(p, m) for p, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and p.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks")]
    if not lists:
        raise DeltatuneError(f"cannot find the transformer layers of {type(model).__name__}; pass targets=[...] "
                             "naming the layer modules")
    path, layers = lists[0]
    return [f"{path}.{i}" for i in range(len(layers))]


def model_body(model: nn.Module) -> str:
    """Path of the transformer body (`model.base_model`, e.g. LlamaModel) inside a model with a head."""
    body = getattr(model, "base_model", None)
    for path, module in model.named_modules():
        if path and module is body:
            return path
    raise DeltatuneError(f"{type(model).__name__} has no transformer body (base_model) inside it; pass targets=[...]")


# ---- config ----------------------------------------------------------------------------------------------------------
def check_bottleneck(method: str, r: int | None, reduction_factor: float) -> None:
    if r is not None and r <= 0:
        raise DeltatuneError(f"{method}: r must be > 0 (or None to use reduction_factor), got {r}")
    if reduction_factor <= 0:
        raise DeltatuneError(f"{method}: reduction_factor must be > 0, got {reduction_factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BottleneckConfig(DeltaConfig):
    """Attributes:
    r: bottleneck width; None uses d // reduction_factor (at least 1), d the adapted width.
    reduction_factor: d / r when r is None (AdapterHub's convention).
    activation: the non-linearity σ between the projections.
    scaling: s, the factor on the adapter's output.
    placement: with targets=None, after the "attention" block, the "ffn" block or "both".
    init: "identity" (W_up = 0: no change at step 0) or "houlsby" (small truncated normal, near identity).
    """

    r: int | None = None
    reduction_factor: float = 16.0
    activation: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    scaling: float = 1.0
    placement: Placement = "ffn"
    init: Literal["identity", "houlsby"] = "identity"

    def validate(self) -> None:
        super().validate()
        check_bottleneck(self.method, self.r, self.reduction_factor)

    def bottleneck_for(self, width: int) -> int:
        return self.r if self.r is not None else max(1, int(width // self.reduction_factor))

    def default_targets(self, model):
        return sublayer_outputs(model, self.placement)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HoulsbyConfig(BottleneckConfig):
    """Houlsby's defaults: two adapters per layer, swish, near-identity init."""

    activation: Literal["relu", "gelu", "swish", "tanh"] = "swish"
    placement: Placement = "both"
    init: Literal["identity", "houlsby"] = "houlsby"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer's defaults: one adapter after the feed-forward block, ReLU."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(BottleneckConfig):
    """He et al.'s parallel adapter beside the feed-forward block."""

    def default_targets(self, model):
        return sublayer_blocks(model, self.placement)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    """The scaled parallel adapter: s = 4."""

    scaling: float = 4.0


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


class Affine(nn.Module):
    """x·Wᵀ + b with nn.Linear's init, for the small networks inside adapters. Not an nn.Linear on purpose: a block
    that hosts an adapter is described by its first and last linear sub-layers, which must stay the model's own."""

    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        reference = nn.Linear(width_in, width_out)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


# ---- the delta -------------------------------------------------------------------------------------------------------
class BottleneckDelta(Delta):
    """h + s·(σ(h·W_downᵀ + b_down)·W_upᵀ + b_up), h the host's output (sequential) or input (parallel).

    Subclasses with other parametrisations (Compacter's PHM, SparseAdapter's masks, HyperFormer's generated weights)
    override `make_parameters` and `projections`; forward, mixed batches and counting build on those."""

    reads_input: ClassVar[bool] = False
    fast_parameters = ("up", "up_bias")

    def __init__(self, config: BottleneckConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.d_in, self.d_out = self.widths(info)
        self.r = config.bottleneck_for(self.d_out)
        self.scaling = config.scaling
        self.act = ACTIVATIONS[config.activation]
        self.make_parameters(config)

    @classmethod
    def widths(cls, info: HostInfo) -> tuple[int, int]:
        """(d_in, d_out): a parallel adapter on a layer reads its input; on a block, input and output share the
        residual width (taken from the block's output, as BERT's output modules read their residual input)."""
        if cls.reads_input and info.kind != MODULE_KIND:
            return info.in_features, info.out_features
        return info.out_features, info.out_features

    def make_parameters(self, config: BottleneckConfig) -> None:
        self.down = nn.Parameter(torch.empty(self.r, self.d_in))
        self.down_bias = nn.Parameter(torch.zeros(self.r))
        self.up = nn.Parameter(torch.zeros(self.d_out, self.r))
        self.up_bias = nn.Parameter(torch.zeros(self.d_out))
        with torch.no_grad():
            if config.init == "houlsby":
                for weight in (self.down, self.up):
                    nn.init.trunc_normal_(weight, std=1e-2, a=-2e-2, b=2e-2)
            else:
                kaiming_(self.down)

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_down (r, d_in), b_down (r,), W_up (d_out, r), b_up (d_out,)), scaling not applied."""
        return self.down, self.down_bias, self.up, self.up_bias

    def adapter_output(self, h: Tensor) -> Tensor:
        """f(h) in the delta's dtype."""
        down, down_bias, up, up_bias = self.projections()
        if h.shape[-1] != down.shape[1]:
            raise DeltatuneError(f"{self.config.method}: the adapter at {self.path!r} reads width {down.shape[1]} "
                                 f"but got {h.shape[-1]}; target another module")
        z = self.act(F.linear(h.to(down.dtype), down, down_bias))
        return F.linear(z, up, up_bias) * self.scaling

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return y + self.adapter_output(x if self.reads_input else y).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: BottleneckConfig, info: HostInfo, path: str) -> int:
        d_in, d_out = cls.widths(info)
        r = config.bottleneck_for(d_out)
        return r * d_in + r + d_out * r + d_out

    @classmethod
    def identity_for(cls, config: BottleneckConfig) -> bool:
        return config.init == "identity"

    # ---- mixed batches -----------------------------------------------------------------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        if len({d.config.activation for d in deltas}) > 1:  # one kernel needs one non-linearity
            return Delta.per_row.__func__(cls, deltas, slots, x, y, host, cache)
        return y + gathered_adapter_output(deltas, slots, x if cls.reads_input else y).to(y.dtype)


def gathered_adapter_output(deltas: list[BottleneckDelta], slots: Tensor, h: Tensor) -> Tensor:
    """Row i gets f_{slots[i]}(h_i) (zero where slots[i] < 0): every adapter's projections zero-padded to the widest
    bottleneck, stacked with an all-zero slot, gathered per row and applied with two bmm."""
    parts = [d.projections() for d in deltas]
    r_max = max(down.shape[0] for down, _, _, _ in parts)
    downs = gather_rows([pad_rank(down, r_max) for down, _, _, _ in parts], slots)  # (batch, r_max, d_in)
    down_biases = gather_rows([pad_rank(b, r_max) for _, b, _, _ in parts], slots)
    ups = gather_rows([pad_rank(up.t(), r_max) * d.scaling for d, (_, _, up, _) in zip(deltas, parts)], slots)
    up_biases = gather_rows([b * d.scaling for d, (_, _, _, b) in zip(deltas, parts)], slots)
    flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(downs.dtype)  # (batch, tokens, d_in)
    z = deltas[0].act(torch.baddbmm(down_biases.unsqueeze(1), flat, downs.transpose(1, 2)))
    out = torch.baddbmm(up_biases.unsqueeze(1), z, ups)  # (batch, tokens, d_out)
    return out.reshape(*h.shape[:-1], out.shape[-1])


def pad_rank(tensor: Tensor, rank: int) -> Tensor:
    """Zero-pad dimension 0 (the bottleneck / rank) of a factor or bias to `rank`, so factors of several adapters
    stack; zero rows add nothing."""
    return F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, rank - tensor.shape[0]))


class SequentialBottleneckDelta(BottleneckDelta):
    """Houlsby / Pfeiffer: the adapter reads and adds to the host's output."""


class HoulsbyDelta(SequentialBottleneckDelta):
    """Houlsby's adapter: as Pfeiffer's, with the near-identity init by default."""

    identity_at_init = False


class ParallelBottleneckDelta(BottleneckDelta):
    """He et al.'s parallel adapter: reads the host's input, adds to its output. On a module whose forward takes the
    residual as `input_tensor` (BERT's BertSelfOutput / BertOutput) it adds f(input_tensor) to that residual."""

    reads_input = True

    def setup(self, host: Host) -> None:
        params = inspect.signature(host.module.forward).parameters
        self.residual_input = host.info.kind == MODULE_KIND and "input_tensor" in params

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        return y if self.residual_input else super().forward(x, y, host)

    def pre_forward(self, args: tuple, kwargs: dict, host: Host) -> tuple[tuple, dict]:
        if not self.residual_input:
            return args, kwargs
        return _with_residual(args, kwargs, host, lambda t: t + self.adapter_output(t).to(t.dtype))

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        return y if deltas[0].residual_input else super().per_row(deltas, slots, x, y, host, cache)

    @classmethod
    def per_row_pre_forward(cls, deltas, slots, args, kwargs, host, cache):
        if not deltas[0].residual_input:
            return args, kwargs
        if len({d.config.activation for d in deltas}) > 1:
            raise DeltatuneError(f"mixed-batch parallel adapters at {host.slot.path!r} need one activation")
        return _with_residual(args, kwargs, host,
                              lambda t: t + gathered_adapter_output(deltas, slots, t).to(t.dtype))


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A module call's arguments by parameter name (positional ones named, **kwargs flattened in)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((bound.pop(n) for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD and n in bound), {})
    return {**bound, **extra}


def _with_residual(args: tuple, kwargs: dict, host: Host, change) -> tuple[tuple, dict]:
    """The host's call with its `input_tensor` argument replaced by change(input_tensor)."""
    bound = inspect.signature(host.module.forward).bind(*args, **kwargs)
    bound.arguments["input_tensor"] = change(bound.arguments["input_tensor"])
    return bound.args, bound.kwargs


SEQUENTIAL_HOSTS = ("linear", "conv1d_hf", "embedding", "norm", MODULE_KIND)
PARALLEL_HOSTS = ("linear", "conv1d_hf", "norm", MODULE_KIND)
PAPER_HOULSBY = "Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019) https://arxiv.org/abs/1902.00751"
PAPER_PFEIFFER = ("AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2021) "
                  "https://arxiv.org/abs/2005.00247")
PAPER_PARALLEL = ("Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2022) "
                  "https://arxiv.org/abs/2110.04366")

register_method("houlsby", config=HoulsbyConfig, family="bottleneck", paper=PAPER_HOULSBY,
                hosts=SEQUENTIAL_HOSTS)(HoulsbyDelta)
register_method("pfeiffer", config=PfeifferConfig, family="bottleneck", paper=PAPER_PFEIFFER,
                hosts=SEQUENTIAL_HOSTS)(SequentialBottleneckDelta)
register_method("parallel_adapter", config=ParallelAdapterConfig, family="bottleneck", paper=PAPER_PARALLEL,
                hosts=PARALLEL_HOSTS)(ParallelBottleneckDelta)
register_method("scaled_parallel_adapter", config=ScaledParallelAdapterConfig, family="bottleneck",
                paper=PAPER_PARALLEL, hosts=PARALLEL_HOSTS)(ParallelBottleneckDelta)

__all__ = [
    "Affine",
    "BottleneckConfig",
    "BottleneckDelta",
    "ParallelBottleneckDelta",
    "SequentialBottleneckDelta",
    "call_arguments",
    "decoder_layers",
    "gathered_adapter_output",
    "model_body",
    "pad_rank",
    "sublayer_blocks",
    "sublayer_outputs",
]
