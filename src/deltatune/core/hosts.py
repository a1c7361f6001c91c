"""Host layers: the base modules a weight delta can sit on, and the one place their weights are read.

Every host is seen by methods through a *matrix view*: a weight of shape (out_features, in_features·kernel) with
`to_matrix` / `from_matrix` converting to and from the module's own layout (transformers `Conv1D` stores (in, out);
`nn.Embedding` is treated as a map from one-hot token ids, so its matrix is weight.T of shape (dim, vocab)).
A method writes its math once on that view and gets Linear, Conv1D, Embedding and Conv support for free.

`read_base_weight` is the single function through which deltas read a base weight, so quantised base layers can be
supported later by registering a reader for their type, without touching any method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DeltatuneError

LINEAR_KINDS = ("linear", "conv1d_hf")
CONV_KINDS = ("conv1d", "conv2d", "conv3d")
WEIGHT_KINDS = ("linear", "conv1d_hf", "embedding", "conv1d", "conv2d", "conv3d")  # hosts with a weight matrix
ALL_KINDS = (*WEIGHT_KINDS, "norm")
# "module": any other module (an MLP block, a decoder layer, the model body) for activation-space methods; its
# widths are those of its first and last linear layers.
MODULE_KIND = "module"


@dataclass(frozen=True)
class HostInfo:
    """What a method needs to know about the layer it adapts.

    Attributes:
        kind: one of ALL_KINDS.
        in_features: input features (Linear / Conv1D), vocabulary size (Embedding) or input channels (Conv).
        out_features: output features, embedding dim, or output channels.
        kernel_size: () except for convolutions.
        weight_shape: the base weight's own shape.
        has_bias: whether the base layer adds a bias.
        channel_dim: dimension of the layer's output that holds out_features (-1, or 1 for convolutions).
    """

    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...]
    weight_shape: tuple[int, ...]
    has_bias: bool
    channel_dim: int

    @property
    def fan_in(self) -> int:
        """Columns of the matrix view: in_features times the kernel volume."""
        return self.in_features * math.prod(self.kernel_size)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): a linear layer storing its weight as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def host_kind(module: nn.Module) -> str | None:
    """The host kind of a module, or None if deltatune cannot adapt its weight."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if is_hf_conv1d(module):
        return "conv1d_hf"
    if is_norm(module):
        return "norm"
    return None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm, including model-specific classes (LlamaRMSNorm, ...) with an elementwise weight."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.weight is not None
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return name.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, nn.Parameter) and weight.ndim == 1


def host_info(module: nn.Module, path: str = "") -> HostInfo | None:
    """Describe a host module; None for modules that are not weight hosts."""
    kind = host_kind(module)
    if kind is None:
        return None
    weight = read_base_weight(module)
    shape = tuple(weight.shape)
    has_bias = getattr(module, "bias", None) is not None
    if kind == "linear":
        return HostInfo(kind, module.in_features, module.out_features, (), shape, has_bias, -1)
    if kind == "conv1d_hf":
        return HostInfo(kind, shape[0], shape[1], (), shape, has_bias, -1)
    if kind == "embedding":
        return HostInfo(kind, module.num_embeddings, module.embedding_dim, (), shape, False, -1)
    if kind == "norm":
        return HostInfo(kind, shape[0], shape[0], (), shape, has_bias, -1)
    if module.groups != 1:
        raise DeltatuneError(
            f"module {path!r} is a grouped convolution (groups={module.groups}); deltatune adapts only groups=1 "
            "convolutions — exclude it from targets"
        )
    return HostInfo(kind, module.in_channels, module.out_channels, tuple(module.kernel_size), shape, has_bias, 1)


def module_info(module: nn.Module, path: str = "") -> HostInfo:
    """HostInfo of a generic module host: in/out widths from its first and last linear-like sub-layers."""
    linears = [m for m in module.modules() if host_kind(m) in LINEAR_KINDS]
    if not linears:
        raise DeltatuneError(f"module {path!r} ({type(module).__name__}) has no linear layer to infer its width from")
    first, last = host_info(linears[0]), host_info(linears[-1])
    return HostInfo(MODULE_KIND, first.in_features, last.out_features, (), (), False, -1)


def placement_of(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a host's deltas live: the base weight's device and a dtype for trainable parameters."""
    kind = host_kind(module)
    if kind is not None:
        weight = read_base_weight(module)
    else:
        weight = next((p for p in module.parameters()), torch.empty(0))
    return weight.device, module_dtype_for_delta(weight)


WeightReader = Callable[[nn.Module], Tensor]
_WEIGHT_READERS: dict[type, WeightReader] = {}


def register_weight_reader(module_type: type, reader: WeightReader) -> None:
    """Teach deltatune to read (e.g. de-quantise) the weight of another base layer type."""
    _WEIGHT_READERS[module_type] = reader


def read_base_weight(module: nn.Module) -> Tensor:
    """The base layer's weight in its own layout, as a dense tensor. The only way deltas read base weights."""
    for module_type, reader in _WEIGHT_READERS.items():
        if isinstance(module, module_type):
            return reader(module)
    return module.weight


def base_weight_parameter(module: nn.Module) -> nn.Parameter:
    """The base layer's weight parameter (what the base weight's version is read from, what merging writes into)."""
    return module.weight


def mergeable_weight(module: nn.Module) -> nn.Parameter:
    """The parameter that merging writes into: a float weight (quantised layers cannot take a merge)."""
    weight = base_weight_parameter(module)
    if not weight.is_floating_point():
        raise DeltatuneError(f"cannot merge into {type(module).__name__}: its weight is stored as {weight.dtype}; "
                             "merge on the full-precision model, then quantise")
    return weight


def to_matrix(info: HostInfo, weight: Tensor) -> Tensor:
    """Native layout -> matrix view (out_features, fan_in); a norm's elementwise weight becomes a column."""
    if info.kind == "norm":
        return weight.reshape(-1, 1)
    if info.kind in ("conv1d_hf", "embedding"):
        return weight.t()
    if info.kind in CONV_KINDS:
        return weight.reshape(info.out_features, -1)
    return weight


def from_matrix(info: HostInfo, matrix: Tensor) -> Tensor:
    """Matrix view (out_features, fan_in) -> native layout."""
    if info.kind == "norm":
        return matrix.reshape(info.weight_shape)
    if info.kind in ("conv1d_hf", "embedding"):
        return matrix.t()
    if info.kind in CONV_KINDS:
        return matrix.reshape(info.weight_shape)
    return matrix


def apply_weight(module: nn.Module, info: HostInfo, x: Tensor, weight: Tensor) -> Tensor:
    """The host's own operation with another weight (native layout) and no bias.

    Norm hosts go through `Host.apply`, which calls the module itself with the weight swapped in."""
    if info.kind == "linear":
        return F.linear(x, weight)
    if info.kind == "conv1d_hf":
        return x @ weight
    if info.kind == "embedding":
        return F.embedding(
            x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
    return module._conv_forward(x, weight, None)


def per_channel(info: HostInfo, vector: Tensor, ndim: int) -> Tensor:
    """Shape an (out_features,) vector to broadcast against a host output with `ndim` dims."""
    if info.channel_dim == 1:
        return vector.view(1, -1, *([1] * (ndim - 2)))
    return vector


def module_dtype_for_delta(weight: Tensor) -> torch.dtype:
    """Deltas on half-precision bases are kept in float32 (as PEFT does), else in the base dtype."""
    if not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype
