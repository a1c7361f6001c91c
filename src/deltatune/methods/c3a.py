"""C³A: "Parameter-Efficient Fine-Tuning via Circular Convolution", Chen et al., 2024,
https://arxiv.org/abs/2407.19342 (PEFT's `C3A`).

Update rule (matrix view, out × fan_in, both divisible by the block size b):  ΔW = C(K) / fan_in, where C(K)
is block-circulant: block (i, j) is the b×b circulant matrix with first row K[i, j]
(entry [t, u] = K[i, j, (u − t) mod b]), so ΔW·x is, block by block, a circular (cross-)correlation of x with
the kernel, computed with FFTs: y_i = Σ_j irfft(rfft(x_j) · conj(rfft(K[i, j]))) / fan_in — O(fan_in·log b)
per output block, never forming ΔW.
The 1/fan_in factor is PEFT's (and the reference code's) normalisation.
Parameters: `c3a_kernel` K (out/b, fan_in/b, b) — out·fan_in/b values, for a rank that is not limited by them.
Init (PEFT's default): K ~ U(±√3·√(2/(in+out))) ("xavier_uniform"), so the model changes at step 0;
"zeros" starts from the identity; "kaiming_uniform" is U(±√(1/in)); "gaussian" N(0, 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, WEIGHT_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import add_dense, gather_rows, refuse_unknown_peft_fields
from .lora import pattern_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class C3aConfig(DeltaConfig):
    """Attributes:
    block_size: b, the side of each circulant block; must divide out_features and fan_in of every adapted
        layer (the default 64 divides the widths of most LLMs; PEFT's default is 256).
    block_size_pattern: module-path regex -> block size, overriding block_size (PEFT's rule).
    init: "xavier_uniform" (PEFT's default), "kaiming_uniform", "gaussian" or "zeros" (identity at init).
    """

    block_size: int = 64
    block_size_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    init: Literal["xavier_uniform", "kaiming_uniform", "gaussian", "zeros"] = "xavier_uniform"

    def validate(self) -> None:
        super().validate()
        if self.block_size <= 0 or any(v <= 0 for v in self.block_size_pattern.values()):
            raise DeltatuneError(f"c3a: block_size must be > 0, got block_size={self.block_size}, "
                                 f"block_size_pattern={self.block_size_pattern}")

    def block_for(self, info: HostInfo, path: str) -> int:
        """The block size at `path`, checked against the layer."""
        b = pattern_value(self.block_size_pattern, path, self.block_size)
        if info.out_features % b or info.fan_in % b:
            raise DeltatuneError(
                f"c3a: block_size {b} does not divide {path!r} ({info.out_features}×{info.fan_in}); pick a "
                f"common divisor (their gcd is {math.gcd(info.out_features, info.fan_in)}) or set "
                "block_size_pattern"
            )
        return b


def block_circulant(kernel: Tensor) -> Tensor:
    """(m, n, b) kernels -> the (m·b, n·b) matrix whose block (i, j) has entry
    [t, u] = kernel[i, j, (u - t) mod b]."""
    m, n, b = kernel.shape
    offsets = torch.arange(b, device=kernel.device)
    index = (offsets.unsqueeze(0) - offsets.unsqueeze(1)) % b  # (t, u) -> (u - t) mod b
    return kernel[:, :, index].permute(0, 2, 1, 3).reshape(m * b, n * b)


def kernel_spectrum(kernel: Tensor) -> Tensor:
    """conj(rfft(K)) over the block axis, (m, n, b//2+1): what a correlation multiplies x's spectrum by."""
    return torch.fft.rfft(kernel, dim=-1).conj()


def circular_correlate(x: Tensor, spectrum: Tensor, b: int) -> Tensor:
    """block_circulant(kernel) @ x for x (..., n·b) through real FFTs of length b, given
    kernel_spectrum(kernel) (m, n, f), or one per batch row (batch, m, n, f) with x (batch, tokens, n·b)."""
    m, n = spectrum.shape[-3:-1]
    x_spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b), dim=-1)  # (..., n, f)
    pattern = "ztnf,zmnf->ztmf" if spectrum.ndim == 4 else "...nf,mnf->...mf"
    out = torch.fft.irfft(torch.einsum(pattern, x_spectrum, spectrum), n=b, dim=-1)  # (..., m, b)
    return out.reshape(*x.shape[:-1], m * b)


class C3aDelta(Delta):
    """y = base(x) + C(K)·x / fan_in, by FFT on Linear / Conv1D hosts and as a dense ΔW elsewhere."""

    identity_at_init = False  # PEFT's default kernel init is xavier-uniform, not zero

    def __init__(self, config: C3aConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        b = config.block_for(info, path)
        self.c3a_kernel = nn.Parameter(torch.zeros(info.out_features // b, info.fan_in // b, b))
        with torch.no_grad():
            if config.init == "xavier_uniform":
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (info.fan_in + info.out_features))
                nn.init.uniform_(self.c3a_kernel, -bound, bound)
            elif config.init == "kaiming_uniform":
                nn.init.uniform_(self.c3a_kernel, -math.sqrt(1.0 / info.fan_in), math.sqrt(1.0 / info.fan_in))
            elif config.init == "gaussian":
                nn.init.normal_(self.c3a_kernel)

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.info.kind not in LINEAR_KINDS:
            return add_dense(x, y, host, self.delta_weight(host))
        kernel = self.c3a_kernel
        update = circular_correlate(x.to(kernel.dtype), kernel_spectrum(kernel), kernel.shape[-1])
        return y + (update / self.info.fan_in).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        return from_matrix(self.info, block_circulant(self.c3a_kernel) / self.info.fan_in)

    # ---- mixed batches: each row's kernel spectrum gathered, one einsum ------------------------------------
    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        b = deltas[0].c3a_kernel.shape[-1]
        if host.info.kind not in LINEAR_KINDS or any(d.c3a_kernel.shape[-1] != b for d in deltas):
            return super().per_row(deltas, slots, x, y, host, cache)
        spectra = gather_rows([kernel_spectrum(d.c3a_kernel) for d in deltas], slots)  # (batch, m, n, f)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(deltas[0].c3a_kernel.dtype)
        update = circular_correlate(flat, spectra, b) / host.info.fan_in
        return y + update.reshape(y.shape).to(y.dtype)

    @classmethod
    def identity_for(cls, config: C3aConfig) -> bool:
        return config.init == "zeros"

    @classmethod
    def num_parameters(cls, config: C3aConfig, info: HostInfo, path: str) -> int:
        return info.out_features * info.fan_in // config.block_for(info, path)


_INIT_TO_PEFT = {"zeros": True, "xavier_uniform": "xavier_uniform", "kaiming_uniform": "kaiming_uniform",
                 "gaussian": "gaussian"}


def _to_peft(config: C3aConfig) -> dict:
    return {"block_size": config.block_size, "block_size_pattern": dict(config.block_size_pattern),
            "init_weights": _INIT_TO_PEFT[config.init], "bias": "none"}


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("C3A", raw, ("block_size", "block_size_pattern", "init_weights", "bias"))
    if raw.get("bias", "none") != "none":
        raise DeltatuneError(f"PEFT C3A bias={raw['bias']!r} is not supported; deltatune supports 'none'")
    init = raw.get("init_weights", "xavier_uniform")
    init = "zeros" if init is True else "xavier_uniform" if init is False else init
    return {"block_size": raw.get("block_size", 256),
            "block_size_pattern": raw.get("block_size_pattern") or {}, "init": init}


PAPER = ("Parameter-Efficient Fine-Tuning via Circular Convolution (Chen et al., 2024) "
         "https://arxiv.org/abs/2407.19342")
register_method("c3a", config=C3aConfig, family="structured", paper=PAPER, hosts=WEIGHT_KINDS,
                peft=PeftFormat("C3A", _to_peft, _from_peft, lambda raw: True))(C3aDelta)
