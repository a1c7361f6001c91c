"""Weight-only int8 base layers, for inference (`deltatune serve --int8`, `deltatune generate --int8`).

Each output channel of a linear weight is stored as int8 with one scale (symmetric, absmax / 127). The forward runs
torch's weight-only int8 kernel (`torch._weight_int8pack_mm`): activations stay bf16, products accumulate in float32
and the channel's scale is applied at the end. A weight costs half the bytes of bf16; when decoding one sequence,
where every weight is streamed once per token, the matmuls run about twice as fast on CPU. At large batches the bf16
kernels (AMX / oneDNN) win: this is a latency option, not a throughput one (see bench/results/serve.md).

The layers stay `nn.Linear`s, so any delta attaches to them as before; deltas that read the base weight see it
de-quantised (`hosts.register_weight_reader`). Merging into an int8 weight is refused (`hosts.mergeable_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import DeltatuneError
from .hosts import register_weight_reader
from .slot import get_state

# torch's CPU kernel reads the reduction dimension in blocks of 16 (other widths crash it): such layers stay as they are
K_MULTIPLE = 16
COMPUTE_DTYPE = torch.bfloat16
CLI_HELP = ("store the base model's linear weights as int8 (per output channel, weight-only): about 1.6x faster "
            "one-sequence decoding on CPU, slower at large batches; outputs differ slightly from bf16")


class Int8Linear(nn.Linear):
    """A linear layer whose weight is int8 (out, in) with one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        out = torch._weight_int8pack_mm(flat, self.weight, self.scales).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype) if x.is_floating_point() else out

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


register_weight_reader(Int8Linear, Int8Linear.dequantized)


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace the model's `nn.Linear` layers by `Int8Linear` in place; returns the paths converted.

    Call it on the base model before any adapter is attached (the deltas' own layers must stay trainable floats).
    Layers whose input width is not a multiple of 16 are left in their own precision. Tied weights (an LM head
    sharing the embedding matrix) are untied: the head gets an int8 copy, the embedding keeps its floats."""
    if get_state(model) is not None:
        raise DeltatuneError("quantize_int8: the model already has adapters; quantise the base model first, "
                             "then load adapters onto it")
    converted = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.in_features % K_MULTIPLE == 0 and child.weight.device.type == "cpu":
                setattr(module, name, Int8Linear(child))
                converted.append(f"{path}.{name}" if path else name)
    if not converted:
        raise DeltatuneError(f"quantize_int8: {type(model).__name__} has no linear layer (on the CPU, input width a "
                             f"multiple of {K_MULTIPLE}) to store as int8")
    return converted
