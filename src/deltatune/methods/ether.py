"""ETHER and ETHER+: "ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections", Bini et al.,
2024, https://arxiv.org/abs/2405.20271

ETHER (matrix view W of shape out × fan_in):  W' = W·H,  H = diag(H_1, ..., H_n),  H_k = I − 2·û_k·û_kᵀ,
n blocks each reflecting its slice of the input space across the hyperplane with unit normal û_k = u_k/‖u_k‖.
A reflection is orthogonal and sits at a fixed distance from the identity, ‖H_k − I‖_F = 2 (so ‖H − I‖_F = 2√n)
whatever u_k is: the update can never drift far from the pretrained weights, which makes ETHER robust to the learning
rate. It is not the identity at init: training starts from a random reflection.
ETHER+ relaxes it to H⁺_k = I − û_k·û_kᵀ + v̂_k·v̂_kᵀ (two interacting hyperplanes; not orthogonal,
‖H⁺_k − I‖_F ≤ √2) applied on both sides:  W' = H̃⁺·W·H⁺  with H̃⁺ built the same way on the output side
(`two_sided=False` keeps only the input side).
Init: u Kaiming-uniform; ETHER+ starts from v = −u (and ṽ = −ũ), so H⁺ = I and the model is unchanged.
Shapes: ether_u (n, fan_in/n); ETHER+ adds ether_v (n, fan_in/n) and, two-sided, ether_u_out, ether_v_out
(n, out/n). The count does not depend on n (n only sets the block structure): fan_in for ETHER,
2·fan_in (+ 2·out two-sided) for ETHER+. Not in PEFT: saved under these names.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, LINEAR_KINDS, HostInfo, from_matrix, to_matrix
from ..core.registry import register_method
from ..core.slot import Host


@dataclasses.dataclass(frozen=True, kw_only=True)
class EtherConfig(DeltaConfig):
    """Attributes:
    n_blocks: number n of diagonal blocks; must divide the layer's fan_in (and, for two-sided ETHER+, its outputs).
    """

    n_blocks: int = 1

    def validate(self) -> None:
        super().validate()
        if self.n_blocks <= 0:
            raise DeltatuneError(f"{self.method}: n_blocks must be > 0, got n_blocks={self.n_blocks}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EtherPlusConfig(EtherConfig):
    """Attributes:
    n_blocks: as ETHER.
    two_sided: transform the output side too (W' = H̃⁺·W·H⁺, the paper's ETHER+); False keeps W' = W·H⁺.
    """

    two_sided: bool = True


def normal_vectors(n_blocks: int, dim: int, config: EtherConfig, path: str, side: str) -> nn.Parameter:
    """One Kaiming-uniform hyperplane normal per block, (n_blocks, dim / n_blocks)."""
    if dim % n_blocks:
        raise DeltatuneError(f"{config.method}: n_blocks={n_blocks} does not divide the {dim} {side} of {path!r}; "
                             f"pick a divisor of {dim} or exclude the module")
    vectors = nn.Parameter(torch.empty(n_blocks, dim // n_blocks))
    with torch.no_grad():
        nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))
    return vectors


def unit(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True)


def input_side(matrix: Tensor, terms: list[tuple[float, Tensor]]) -> Tensor:
    """X·(H − I) for block-diagonal H − I = Σ_j c_j·diag(ŵ_jk ŵ_jkᵀ)_k, terms = [(c_j, ŵ_j (n, b))]."""
    n, b = terms[0][1].shape
    blocks = matrix.reshape(matrix.shape[0], n, b)
    out = sum(c * torch.einsum("on,nb->onb", torch.einsum("onb,nb->on", blocks, w), w) for c, w in terms)
    return out.reshape(matrix.shape)


def output_side(matrix: Tensor, terms: list[tuple[float, Tensor]]) -> Tensor:
    """(H̃ − I)·X for block-diagonal H̃ − I acting on X's rows."""
    return input_side(matrix.t(), terms).t()


class EtherDelta(Delta):
    """y = base(x) + W·(H − I)·x with H block-diagonal Householder reflections."""

    identity_at_init = False  # a reflection is never the identity
    uses_base_weight = True

    def __init__(self, config: EtherConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.ether_u = normal_vectors(config.n_blocks, info.fan_in, config, path, "inputs")

    def input_terms(self) -> list[tuple[float, Tensor]]:
        return [(-2.0, unit(self.ether_u))]

    def output_terms(self) -> list[tuple[float, Tensor]] | None:
        return None

    def delta_matrix(self, matrix: Tensor) -> Tensor:
        """H̃·X·H − X (H̃ = I when there is no output side)."""
        delta = input_side(matrix, self.input_terms())
        outer = self.output_terms()
        return delta if outer is None else delta + output_side(matrix + delta, outer)

    def delta_weight(self, host: Host) -> Tensor:
        matrix = to_matrix(self.info, host.weight().to(self.ether_u.dtype))
        return from_matrix(self.info, self.delta_matrix(matrix))

    def input_transform(self) -> Tensor:
        """The dense input-side matrix H (fan_in × fan_in); for inspection and tests."""
        eye = torch.eye(self.info.fan_in, dtype=self.ether_u.dtype, device=self.ether_u.device)
        return eye + input_side(eye, self.input_terms())

    @classmethod
    def num_parameters(cls, config: EtherConfig, info: HostInfo, path: str) -> int:
        return info.fan_in


class EtherPlusDelta(EtherDelta):
    """y = base(x) + (H̃⁺·W·H⁺ − W)·x, H⁺ = I − ûûᵀ + v̂v̂ᵀ per block."""

    identity_at_init = True  # v = −u gives v̂v̂ᵀ = ûûᵀ

    def __init__(self, config: EtherPlusConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.ether_v = nn.Parameter(-self.ether_u.detach().clone())
        if config.two_sided:
            self.ether_u_out = normal_vectors(config.n_blocks, info.out_features, config, path, "outputs")
            self.ether_v_out = nn.Parameter(-self.ether_u_out.detach().clone())

    def input_terms(self) -> list[tuple[float, Tensor]]:
        return [(-1.0, unit(self.ether_u)), (1.0, unit(self.ether_v))]

    def output_terms(self) -> list[tuple[float, Tensor]] | None:
        if not self.config.two_sided:
            return None
        return [(-1.0, unit(self.ether_u_out)), (1.0, unit(self.ether_v_out))]

    @classmethod
    def num_parameters(cls, config: EtherPlusConfig, info: HostInfo, path: str) -> int:
        return 2 * info.fan_in + (2 * info.out_features if config.two_sided else 0)


PAPER = ("ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections (Bini et al., 2024) "
         "https://arxiv.org/abs/2405.20271")
HOSTS = (*LINEAR_KINDS, *CONV_KINDS)
register_method("ether", config=EtherConfig, family="orthogonal", paper=PAPER, hosts=HOSTS)(EtherDelta)
register_method("ether_plus", config=EtherPlusConfig, family="orthogonal", paper=PAPER, hosts=HOSTS)(EtherPlusDelta)
