"""FourierFT: "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", Gao et al., 2024,
https://arxiv.org/abs/2405.03003 (PEFT's `FOURIERFT`).

Update rule (matrix view, out × fan_in):  ΔW = α · Re(IDFT2(F)),  F = 0 except F[e_k] = c_k for k = 1..n,
where the n entry positions e_k ∈ [0, out)×[0, fan_in) are drawn once from `seed` and shared by nothing else.
Only the n coefficients c (`fourierft_spectrum`, shape (n,)) train. The positions are regenerated from the
seed (the first n of a seeded permutation of the out·fan_in entries, row-major — PEFT's rule), never saved.
Init (paper and PEFT default): c ~ N(0, 1), so the model changes at step 0; "zeros" starts from the identity.
ΔW is dense and materialised per call: the method trades compute for its tiny parameter count.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import WEIGHT_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import refuse_unknown_peft_fields
from .lora import pattern_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class FourierftConfig(DeltaConfig):
    """Attributes:
    n_frequency: n, the number of trainable spectral coefficients per layer.
    alpha: α, the scale applied to the inverse DFT (PEFT's `scaling`).
    seed: seed of the frozen entry positions (PEFT's `random_loc_seed`).
    init: "gaussian" (c ~ N(0, 1), the paper's) or "zeros" (identity at init).
    n_frequency_pattern: module-path regex -> n, overriding n_frequency (PEFT's rule).
    """

    n_frequency: int = 1000
    alpha: float = 150.0
    seed: int = 777
    init: Literal["gaussian", "zeros"] = "gaussian"
    n_frequency_pattern: dict[str, int] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.n_frequency <= 0 or any(v <= 0 for v in self.n_frequency_pattern.values()):
            raise DeltatuneError(f"fourierft: n_frequency must be > 0, got n_frequency={self.n_frequency}, "
                                 f"n_frequency_pattern={self.n_frequency_pattern}")

    def n_for(self, path: str) -> int:
        return pattern_value(self.n_frequency_pattern, path, self.n_frequency)


def spectral_entries(rows: int, cols: int, n: int, seed: int) -> Tensor:
    """(2, n) row / column indices of the trainable spectrum: the first n of a seeded permutation of the
    rows·cols entries."""
    flat = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // cols, flat % cols])


def inverse_dft_update(spectrum: Tensor, entries: Tensor, shape: tuple[int, int], alpha: float) -> Tensor:
    """α·Re(IDFT2(F)) for the sparse spectrum F holding `spectrum` at `entries`."""
    dense = spectrum.new_zeros(shape)
    dense[entries[0], entries[1]] = spectrum
    return torch.fft.ifft2(dense).real * alpha


class FourierftDelta(Delta):
    """y = base(x) + α·Re(IDFT2(F))·x."""

    identity_at_init = False  # the paper's default init draws the spectrum from N(0, 1)

    def __init__(self, config: FourierftConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        n = config.n_for(path)
        if n > info.out_features * info.fan_in:
            raise DeltatuneError(
                f"fourierft: n_frequency={n} exceeds the {info.out_features}×{info.fan_in} entries of "
                f"{path!r}; lower n_frequency or set n_frequency_pattern for this module"
            )
        self.alpha = config.alpha
        start = torch.randn(n) if config.init == "gaussian" else torch.zeros(n)
        self.fourierft_spectrum = nn.Parameter(start)
        # Frozen and regenerated from the seed on every attach or load, so never saved.
        self.register_buffer("entries", spectral_entries(info.out_features, info.fan_in, n, config.seed),
                             persistent=False)

    def delta_weight(self, host: Host) -> Tensor:
        shape = (self.info.out_features, self.info.fan_in)
        update = inverse_dft_update(self.fourierft_spectrum, self.entries, shape, self.alpha)
        return from_matrix(self.info, update)

    @classmethod
    def identity_for(cls, config: FourierftConfig) -> bool:
        return config.init == "zeros"

    @classmethod
    def num_parameters(cls, config: FourierftConfig, info: HostInfo, path: str) -> int:
        return config.n_for(path)


_PEFT_FIELDS = ("n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern",
                "fan_in_fan_out", "bias")


def _to_peft(config: FourierftConfig) -> dict:
    return {"n_frequency": config.n_frequency, "scaling": config.alpha, "random_loc_seed": config.seed,
            "init_weights": config.init == "zeros", "n_frequency_pattern": dict(config.n_frequency_pattern),
            "bias": "none", "fan_in_fan_out": False}  # PEFT sets fan_in_fan_out per layer type itself


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("FOURIERFT", raw, _PEFT_FIELDS)
    if raw.get("bias", "none") != "none":
        raise DeltatuneError(
            f"PEFT FOURIERFT bias={raw['bias']!r} is not supported; deltatune supports 'none'"
        )
    return {"n_frequency": raw.get("n_frequency", 1000), "alpha": raw.get("scaling", 150.0),
            "seed": raw.get("random_loc_seed", 777),
            "init": "zeros" if raw.get("init_weights") else "gaussian",
            "n_frequency_pattern": raw.get("n_frequency_pattern") or {}}


PAPER = ("Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., 2024) "
         "https://arxiv.org/abs/2405.03003")
register_method("fourierft", config=FourierftConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS,
                peft=PeftFormat("FOURIERFT", _to_peft, _from_peft, lambda raw: True))(FourierftDelta)
