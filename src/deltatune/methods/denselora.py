"""DenseLoRA: "DenseLoRA: Dense Low-Rank Adaptation of Large Language Models", Mu et al., 2025,
https://arxiv.org/abs/2505.23808

Representation-finetuning style: one Encoder-Decoder pair, shared by every adapted layer of the same kind, compresses
and refines the hidden representation; each layer adapts through its own small dense matrix M in the compressed space:
    Δh = s·σ(D·M·σ(E·x)),   σ = GELU,   s = alpha / r,
with E (r × in) and D (out × r) shared, M (r × r) per layer. "Same kind" = same module name and shape (the authors
keep one pair per projection type, e.g. all q_proj); the pairs live in the adapter-wide shared module.
Init (authors' code): E and M Kaiming-uniform, D = 0, so σ(0) = 0 and the model is unchanged at step 0.
The update is not linear in x (σ), so it cannot be written as a weight: not mergeable.
Trainable parameters: r² per layer (`num_parameters`) plus r·(in + out) per shared pair (`num_shared_parameters`).
Saved as `<module>.M` and `deltatune_shared.<name>_<out>x<in>.lora_A / lora_B` (E / D).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import check_positive, kaiming_rows


def sharing_key(path: str, info: HostInfo) -> str:
    """Layers that share adapter-wide factors: same module name and same matrix-view shape."""
    return f"{path.rsplit('.', 1)[-1]}_{info.out_features}x{info.fan_in}"


def unique_shapes(hosts: dict[str, HostInfo]) -> dict[str, HostInfo]:
    """One HostInfo per sharing key, in host order."""
    out: dict[str, HostInfo] = {}
    for path, info in hosts.items():
        out.setdefault(sharing_key(path, info), info)
    return out


class LoraPair(nn.Module):
    """A down factor lora_A (r × in, Kaiming-uniform) and an up factor lora_B (out × r, zero)."""

    def __init__(self, r: int, fan_in: int, out: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(kaiming_rows((r, fan_in)))
        self.lora_B = nn.Parameter(torch.zeros(out, r))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseloraConfig(DeltaConfig):
    """Attributes:
    r: width of the compressed representation (E: in → r, M: r → r, D: r → out).
    alpha: scaling numerator (s = alpha / r).
    """

    r: int = 16
    alpha: float = 32.0

    def validate(self) -> None:
        super().validate()
        check_positive("denselora", r=self.r)


class DenseloraDelta(Delta):
    """y + s·GELU(D·M·GELU(E·x)) with E, D shared across layers of the same kind."""

    def __init__(self, config: DenseloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.check_rank(config.r)
        self.key = sharing_key(path, info)
        self.M = nn.Parameter(kaiming_rows((config.r, config.r)))
        self.scaling = config.alpha / config.r

    @classmethod
    def make_shared(cls, config: DenseloraConfig, hosts: dict[str, HostInfo]) -> nn.Module:
        pairs = unique_shapes(hosts)
        return nn.ModuleDict({k: LoraPair(config.r, i.fan_in, i.out_features) for k, i in pairs.items()})

    @classmethod
    def num_shared_parameters(cls, config: DenseloraConfig, hosts: dict[str, HostInfo]) -> int:
        """The shared Encoder-Decoder pairs: r·(in + out) for each kind of layer."""
        return sum(config.r * (i.fan_in + i.out_features) for i in unique_shapes(hosts).values())

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        pair = self.shared[self.key]
        encoder, decoder = pair.lora_A, pair.lora_B
        if self.info.kind == "embedding":
            h = host.apply(x, encoder.t())  # E·onehot(x): (..., r)
        else:
            h = x.to(encoder.dtype) @ encoder.t()  # (..., r)
        h = F.gelu(h) @ self.M.t()
        return y + (F.gelu(h @ decoder.t()) * self.scaling).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: DenseloraConfig, info: HostInfo, path: str) -> int:
        return config.r * config.r


PAPER = "DenseLoRA: Dense Low-Rank Adaptation of Large Language Models (Mu et al., 2025) https://arxiv.org/abs/2505.23808"
register_method("denselora", config=DenseloraConfig, family="low-rank", paper=PAPER,
                hosts=("linear", "conv1d_hf", "embedding"))(DenseloraDelta)
