"""Data-free LoRA initialisations that read the base weight, and the quantisers LoftQ needs.

A helper module: it registers no method. Each init is a pure function of the base weight in the matrix view
(out × in, float32), the rank r and the LoRA scaling s, returning the factors (A (r, in), B (out, r)) with
s·B·A = the part of W the paper moves into the adapter. The papers subtract that part from the base weight; deltatune
never edits base weights, so `LoraDelta` keeps a frozen copy (A₀, B₀) and adds s·(B·A − B₀·A₀): the model is
unchanged at step 0 and the trained update is exactly the paper's.

- PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948): the top-r singular triplets, A = √(σ/s)·Vᵀ,
  B = U·√(σ/s) (PEFT's convention; `niter` > 0 uses the randomised SVD like PEFT's "pissa_niter_N").
- MiLoRA (Wang et al., 2024, https://arxiv.org/abs/2406.09044): the same with the r *smallest* singular triplets.
- OLoRA (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775): W = Q·R, B = Q[:, :r], A = R[:r] (as PEFT; no
  division by s).
- NLoRA (Guo et al., 2025, https://arxiv.org/abs/2502.14482): a Nyström sketch W ≈ (W·Ω)(Ψᵀ·W·Ω)⁺(Ψᵀ·W) with
  seeded Gaussian Ω (in × r), Ψ (out × r); the r × r core is split by its SVD so the two factors are balanced
  (the paper keeps it as SLoRA's middle matrix; here it is folded into A and B).
- LoftQ (Li et al., 2023, https://arxiv.org/abs/2310.08659): alternate Q = quant(W − B·A) and B·A = SVD_r(W − Q);
  the quantiser is a real blockwise NF4 (QLoRA's 16-level code, absmax per block) or uniform int4.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.errors import DeltatuneError

# QLoRA's NormalFloat-4 code: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (Dettmers et al., 2023).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

Factors = tuple[Tensor, Tensor]  # (A (r, in), B (out, r))


def _balanced(u: Tensor, s: Tensor, vh: Tensor, scaling: float) -> Factors:
    """A = √(σ/s)·Vᵀ, B = U·√(σ/s), so that s·B·A = U·diag(σ)·Vᵀ."""
    root = (s / scaling).clamp_min(0).sqrt()
    return root.unsqueeze(1) * vh, u * root


def _check_rank(weight: Tensor, r: int, name: str) -> None:
    if r > min(weight.shape):
        raise DeltatuneError(f"{name} init needs r <= min(out, in) = {min(weight.shape)}, got r={r}; lower r")


def pissa(weight: Tensor, r: int, scaling: float, niter: int = 0) -> Factors:
    """Principal singular components of W."""
    _check_rank(weight, r, "pissa")
    if niter > 0:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        return _balanced(u, s, v.t(), scaling)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return _balanced(u[:, :r], s[:r], vh[:r], scaling)


def milora(weight: Tensor, r: int, scaling: float) -> Factors:
    """Minor singular components of W (the r smallest singular values)."""
    _check_rank(weight, r, "milora")
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return _balanced(u[:, -r:], s[-r:], vh[-r:], scaling)


def olora(weight: Tensor, r: int, scaling: float) -> Factors:
    """W = Q·R: A = R[:r] (upper-triangular rows), B = Q[:, :r] (orthonormal columns)."""
    _check_rank(weight, r, "olora")
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def path_seed(path: str, seed: int) -> int:
    """A seed that differs per module but is the same in every process and run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") & 0x7FFFFFFF


def nystrom_sketch(weight: Tensor, r: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(W·Ω (out, r), core = Ψᵀ·W·Ω (r, r), Ψᵀ·W (r, in)) with seeded Gaussian sketches."""
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(weight.shape[1], r, generator=g).to(weight)
    psi = torch.randn(weight.shape[0], r, generator=g).to(weight)
    columns = weight @ omega
    return columns, psi.t() @ columns, psi.t() @ weight


def nlora(weight: Tensor, r: int, scaling: float, seed: int = 0) -> Factors:
    """s·B·A = (W·Ω)(Ψᵀ·W·Ω)⁺(Ψᵀ·W); the pseudo-inverse core split by its SVD, so BA stays balanced."""
    _check_rank(weight, r, "nlora")
    columns, core, rows = nystrom_sketch(weight, r, seed)
    u, s, vh = torch.linalg.svd(core)
    keep = s > s.max() * 1e-6
    inv_root = torch.where(keep, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s)).sqrt() / scaling**0.5
    # core⁺ = V·diag(1/σ)·Uᵀ: B = W·Ω·V·√(1/σ), A = √(1/σ)·Uᵀ·Ψᵀ·W.
    return inv_root.unsqueeze(1) * (u.t() @ rows), (columns @ vh.t()) * inv_root


# ---- quantisers and LoftQ ---------------------------------------------------------------------------------------------
def _blocks(weight: Tensor, block_size: int) -> tuple[Tensor, int]:
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size), pad


def _unblocks(blocks: Tensor, pad: int, shape: torch.Size) -> Tensor:
    flat = blocks.reshape(-1)
    return (flat[: flat.numel() - pad] if pad else flat).view(shape)


def quantize_nf4(weight: Tensor, block_size: int = 64) -> Tensor:
    """De-quantised blockwise NF4: each block scaled by its absmax, every entry rounded to the nearest NF4 level."""
    blocks, pad = _blocks(weight, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    levels = torch.tensor(NF4_LEVELS, dtype=weight.dtype, device=weight.device)
    codes = (blocks / scale).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    return _unblocks(levels[codes] * scale, pad, weight.shape)


def quantize_int4(weight: Tensor, block_size: int = 64) -> Tensor:
    """De-quantised blockwise asymmetric int4: 16 uniform levels between each block's min and max."""
    blocks, pad = _blocks(weight, block_size)
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    step = ((high - low) / 15).clamp_min(1e-12)
    codes = ((blocks - low) / step).round().clamp(0, 15)
    return _unblocks(codes * step + low, pad, weight.shape)


QUANTIZERS: dict[str, Callable[[Tensor, int], Tensor]] = {"nf4": quantize_nf4, "int4": quantize_int4}


def loftq_alternation(weight: Tensor, r: int, iters: int = 1, quantizer: str = "nf4",
                      block_size: int = 64) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """LoftQ's alternating minimisation of ‖W − Q − L·R‖_F: (Q, L (out, r), R (r, in), the error after each
    alternation). Q is the de-quantised weight a quantised base layer would hold."""
    if quantizer not in QUANTIZERS:
        raise DeltatuneError(f"loftq: quantizer must be one of {sorted(QUANTIZERS)}, got {quantizer!r}")
    if iters < 1:
        raise DeltatuneError(f"loftq: iters must be >= 1, got {iters}")
    _check_rank(weight, r, "loftq")
    quant = QUANTIZERS[quantizer]
    low_rank = torch.zeros_like(weight)
    errors = []
    for _ in range(iters):
        q = quant(weight - low_rank, block_size)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        left, right = u[:, :r] * s[:r].sqrt(), s[:r].sqrt().unsqueeze(1) * vh[:r]
        low_rank = left @ right
        errors.append(float(torch.linalg.norm(weight - q - low_rank)))
    return q, left, right, errors


def loftq(weight: Tensor, r: int, scaling: float, bits: int = 4, iters: int = 1, quantizer: str = "nf4",
          block_size: int = 64) -> Factors:
    """s·B·A = LoftQ's low-rank correction of the quantisation error."""
    if bits != 4:
        raise DeltatuneError(f"loftq: only 4-bit quantisers (nf4, int4) are implemented, got bits={bits}")
    _, left, right, _ = loftq_alternation(weight, r, iters, quantizer, block_size)
    return right / scaling**0.5, left / scaling**0.5


# name -> (function, the init_options it accepts)
DATA_FREE: dict[str, tuple[Callable[..., Factors], tuple[str, ...]]] = {
    "pissa": (pissa, ("niter",)),
    "milora": (milora, ()),
    "olora": (olora, ()),
    "nlora": (nlora, ("seed",)),
    "loftq": (loftq, ("bits", "iters", "quantizer", "block_size")),
}
# Inits computed from data by `deltatune.algorithms.inits.initialize`; the config only records them.
DATA_DRIVEN = ("eva", "corda_ipm", "corda_kpm", "lora_ga", "lora_one")
# Inits whose factors start non-zero: the delta keeps a frozen copy (A₀, B₀) and subtracts it.
WITH_OFFSET = frozenset({*DATA_FREE, "corda_ipm", "corda_kpm", "lora_ga", "lora_one"})


def check_init_options(method: str, init: str, options: dict) -> None:
    """Options must belong to the chosen init."""
    allowed = DATA_FREE[init][1] if init in DATA_FREE else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise DeltatuneError(f"{method}: init_options {unknown} do not apply to init={init!r} (valid: {valid})")


def data_free_factors(init: str, weight: Tensor, r: int, scaling: float, options: dict, path: str) -> Factors:
    """The factors of a data-free init for one module (NLoRA's sketch seeded per module path)."""
    function = DATA_FREE[init][0]
    options = dict(options)
    if init == "nlora":
        options["seed"] = path_seed(path, int(options.get("seed", 0)))
    return function(weight.float(), r, scaling, **options)
