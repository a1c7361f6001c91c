"""KaSA: "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models", Wang et al., 2024,
https://arxiv.org/abs/2412.06071

Update rule (matrix view, W = U Σ Vᵀ with k = min(out, fan_in) triplets):
    W' = W − U_minor Σ_minor V_minorᵀ + s·B·diag(ΔΣ)·A,   s = alpha / r (rsLoRA: alpha / √r),
i.e. the r smallest ("noisy", long-tail) singular components of W are dropped — the base becomes its best
rank-(k − r) approximation — and an SVD-form LoRA with a trainable diagonal ΔΣ between A and B learns the update.
Init: A Kaiming-uniform, B = 0, ΔΣ ~ N(0, 1) (as PEFT), so at step 0 the model is the *truncated* base: KaSA is not
an identity at init. Parameters: LoRA's A (r, fan_in), B (out, r) plus ΔΣ (r,), saved under PEFT's names
(`lora_A.weight`, `lora_B.weight`, `lora_diag`) with `kasa_config` in adapter_config.json, so adapters move between
PEFT (`LoraConfig(kasa_config=KasaConfig())`, Linear layers only there) and deltatune.

PEFT overwrites the base weight with its truncation; deltatune never touches base weights, so the truncation is part
of this delta's ΔW, computed once at setup from the unmerged base weight (fixed-sign SVD, see `spectral.py`; the
product U_minor Σ_minor V_minorᵀ is sign-invariant anyway) and kept as frozen buffers, never saved. Being fixed, it
stays the same after merges, so unmerging needs no stored copy.
The paper trains with regularisers β‖ΔΣ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F); `regularization_loss()` returns them for
the training loop to add.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import CONV_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .lora import LoraConfig, LoraDelta, lora_matrix
from .lora_peft import lora_peft_format
from .spectral import base_svd, full_rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class KasaConfig(LoraConfig):
    """LoRA's fields (r is also how many minor singular components are dropped), plus:

    Attributes:
        beta: weight of the singular-value penalty ‖ΔΣ‖² in `regularization_loss`.
        gamma: weight of the orthogonality penalty ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F in `regularization_loss`.
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def validate(self) -> None:
        super().validate()
        if self.beta < 0 or self.gamma < 0:
            raise DeltatuneError(f"kasa: beta and gamma must be >= 0, got beta={self.beta}, gamma={self.gamma}")


class KasaDelta(LoraDelta):
    """y = base(x) − U_minor Σ_minor V_minorᵀx + s·B(ΔΣ ⊙ A(dropout(x))) (+ Δb)."""

    identity_at_init = False

    def __init__(self, config: KasaConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        k = full_rank(info)
        if self.r >= k:
            raise DeltatuneError(
                f"kasa: r={self.r} must be below min(out, in)={k} at {path!r} so that the truncated base keeps at "
                "least one singular component; lower r (or rank_pattern for this module)"
            )
        self.lora_diag = nn.Parameter(torch.randn(self.r))
        self.register_buffer("minor_u", torch.empty(0), persistent=False)  # U_minor Σ_minor (out, r)
        self.register_buffer("minor_v", torch.empty(0), persistent=False)  # V_minorᵀ (r, fan_in)

    def setup(self, host: Host) -> None:
        u, sigma, vh = base_svd(self.info, host.weight(), self.lora_A.dtype)
        minor = slice(full_rank(self.info) - self.r, None)
        self.minor_u = (u[:, minor] * sigma[minor]).contiguous().to(self.lora_A.device)
        self.minor_v = vh[minor].contiguous().to(self.lora_A.device)

    def down(self, x: Tensor, host: Host) -> Tensor:
        """ΔΣ ⊙ A(x): LoRA's down-projection with the trainable singular values applied."""
        h = super().down(x, host)
        if self.info.kind in CONV_KINDS:
            return h * self.lora_diag.view(1, -1, *([1] * (h.ndim - 2)))
        return h * self.lora_diag

    def minor_output(self, x: Tensor, host: Host) -> Tensor:
        """U_minor Σ_minor V_minorᵀ·x: what the truncation removes from the base output."""
        if self.info.kind in CONV_KINDS:
            return host.apply(x.to(self.minor_v.dtype), from_matrix(self.info, self.minor_u @ self.minor_v))
        if self.info.kind == "embedding":
            return F.linear(F.embedding(x, self.minor_v.t()), self.minor_u)
        return F.linear(F.linear(x.to(self.minor_v.dtype), self.minor_v), self.minor_u)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        out = super().forward(x, y, host)  # the undropped input meets the truncation, as PEFT's truncated base
        return out - self.minor_output(x, host).to(out.dtype)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        """down = [A; V_minorᵀ], up = [s·B·diag(ΔΣ), −U_minor Σ_minor]: the gathered mixed-batch kernel's view."""
        down = torch.cat([self.lora_A.reshape(self.r, -1), self.minor_v])
        up = torch.cat([self.lora_B.reshape(-1, self.r) * (self.lora_diag * self.scaling), -self.minor_u], dim=1)
        return down, up

    def delta_weight(self, host: Host) -> Tensor:
        lora_b = self.lora_B.reshape(-1, self.r) * self.lora_diag
        update = lora_matrix(self.lora_A, lora_b, self.scaling) - self.minor_u @ self.minor_v
        return from_matrix(self.info, update)

    def regularization_loss(self) -> Tensor:
        """β‖ΔΣ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), the paper's auxiliary terms (Eq. 9–11)."""
        a = self.lora_A.reshape(self.r, -1)
        b = self.lora_B.reshape(-1, self.r)
        eye = torch.eye(self.r, dtype=a.dtype, device=a.device)
        orthogonality = torch.linalg.norm(b.t() @ b - eye) + torch.linalg.norm(a @ a.t() - eye)
        return self.config.beta * self.lora_diag.pow(2).sum() + self.config.gamma * orthogonality

    @classmethod
    def num_parameters(cls, config: KasaConfig, info: HostInfo, path: str) -> int:
        return super().num_parameters(config, info, path) + config.rank_for(path)

    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {**super().state_tensors(host), "lora_diag": self.lora_diag.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        rest = dict(tensors)
        with torch.no_grad():
            self.lora_diag.copy_(rest.pop("lora_diag"))
        super().load_state_tensors(rest, host)


def kasa_peft_format() -> PeftFormat:
    """PEFT's LoraConfig with `kasa_config` set: LoRA's fields plus {"beta", "gamma"}."""
    lora = lora_peft_format(dora=False)

    def to_peft(config: KasaConfig) -> dict:
        return {**lora.to_peft(config), "kasa_config": {"beta": config.beta, "gamma": config.gamma}}

    def from_peft(raw: dict) -> dict:
        rest = dict(raw)
        kasa = rest.pop("kasa_config")
        if rest.get("use_dora"):
            raise DeltatuneError("PEFT LoRA config sets both kasa_config and use_dora=True; deltatune has no such mix")
        return {**lora.from_peft(rest), "beta": kasa.get("beta", 1e-4), "gamma": kasa.get("gamma", 1e-3)}

    return PeftFormat("LORA", to_peft, from_peft, lambda raw: isinstance(raw.get("kasa_config"), dict))


PAPER = ("KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models (Wang et al., 2024) "
         "https://arxiv.org/abs/2412.06071")
register_method("kasa", config=KasaConfig, family="singular-value", paper=PAPER, peft=kasa_peft_format())(KasaDelta)
