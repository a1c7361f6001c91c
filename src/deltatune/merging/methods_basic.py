"""mergekit's merge methods, each a pure function of one tensor from every model (and the base model's).

Formulas follow mergekit (the reference implementation the tests compare with), with τᵢ = θᵢ − θ_base:
- linear: Σ wᵢθᵢ / Σ wᵢ (model soups, https://arxiv.org/abs/2203.05482).
- the task-arithmetic family, one function over (sparsifier, consensus, defaults) — `TASK_ARITHMETIC_FAMILY`:
  θ_base + λ·Σ wᵢ·mᵢ·sparsify(τᵢ) / (normalize ? Σ wᵢ·mᵢ : 1), mᵢ the sign-consensus mask (or 1).
- slerp: spherical interpolation between base and one model over the flattened tensor, lerp when nearly collinear.
- nuslerp: slerp of two models (or of their task vectors around a base), t = w₂/(w₁+w₂), flattened or row-wise.
- multislerp: weighted barycentre on the hypersphere through the tangent space at the weighted mean direction.
- karcher: iterative Riemannian mean of the unit directions, times the mean norm.
- model_stock: t = N·cosθ / (1 + (N−1)·cosθ) between the models' mean and the base (filter-wise optional).
- sce: select entries by variance across models, weight models by mean τ², TIES sign consensus.
- nearswap: take the model's value where |θ₁ − θ_base| < t (weight t/|diff| clamped to [0, 1]).
- passthrough: one model's tensor, optionally scaled (layer stacking uses it through slices).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..core.errors import DeltatuneError
from .registry import PerModel, TensorInfo, generator_for, merge_method
from .sparsify import (
    bernoulli_mask,
    della_mask,
    elected_sign,
    magnitude_mask,
    outliers_mask,
    rescale_l1,
    sign_consensus,
)


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@merge_method("linear", paper="Model soups (Wortsman et al., 2022) https://arxiv.org/abs/2203.05482")
def linear(tensors: list[Tensor], *, weight: PerModel[float] = 1.0, normalize: bool = True) -> Tensor:
    dtype = _work_dtype(tensors[0])
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for t, w in zip(tensors, weight):
        out.add_(t.to(dtype), alpha=w)
    if normalize:
        out.div_(sum(weight))
    return out.to(tensors[0].dtype)


Sparsifier = Literal["none", "magnitude", "outliers", "bernoulli", "della"]
Consensus = Literal["none", "sum", "count"]


def _sparsified(tau: Tensor, sparsifier: str, density: float, gamma: float, epsilon: float, rescale: bool,
                generator: torch.Generator) -> Tensor:
    """τ with the sparsifier's mask applied in place (and L1-rescaled when asked)."""
    if sparsifier == "none" or density >= 1:
        return tau
    if sparsifier == "magnitude":
        mask = magnitude_mask(tau, density)
    elif sparsifier == "outliers":
        mask = outliers_mask(tau, density, gamma)
    elif sparsifier == "bernoulli":
        mask = bernoulli_mask(tau, density, generator)
    else:
        mask = della_mask(tau, density, epsilon, generator)
    if not rescale:
        return tau.masked_fill_(~mask, 0)
    original = tau.clone()
    return rescale_l1(original, tau.masked_fill_(~mask, 0))


def task_arithmetic_family(tensors: list[Tensor], base: Tensor, *, weight: PerModel[float] = 1.0,
                           density: PerModel[float] = 1.0, gamma: PerModel[float] = 0.01,
                           epsilon: PerModel[float] = 0.15, lambda_: float = 1.0, normalize: bool = False,
                           rescale: bool = False, int8_mask: bool = False, seed: int = 0,
                           sparsifier: Sparsifier = "none", consensus: Consensus = "none",
                           info: TensorInfo) -> Tensor:
    """Generalised task arithmetic, computed in float32 for half-precision inputs (float64 stays float64).

    `int8_mask` is accepted for mergekit configs; it only saved memory there."""
    dtype = _work_dtype(base)
    work_base = base.to(dtype)
    generator = generator_for(seed, info)
    deltas = work_base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        torch.sub(t.to(dtype), work_base, out=deltas[i])
        _sparsified(deltas[i], sparsifier, density[i], gamma[i], epsilon[i], rescale, generator)
        deltas[i].mul_(weight[i])
    if consensus != "none":
        mixed, divisor = _elected_sum(deltas, weight, consensus)
    else:
        mixed = deltas[0].clone()
        for delta in deltas[1:]:
            mixed += delta
        total = sum(weight)
        divisor = 1.0 if abs(total) < 1e-8 else total
    del deltas
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(work_base).to(base.dtype)


def _elected_sum(deltas: Tensor, weight: list[float], consensus: str) -> tuple[Tensor, Tensor]:
    """(Σᵢ of the weighted deltas agreeing with the elected sign, Σᵢ of the agreeing models' weights, 0 → 1).

    With s = ±1 the elected sign, an entry agrees iff s·δ > 0, so max(s·δ, 0) keeps exactly the agreeing
    magnitudes: the loop works in place, one model at a time."""
    sign = elected_sign(deltas, consensus)
    mixed = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for i in range(deltas.shape[0]):
        kept = deltas[i].mul_(sign).clamp_(min=0)
        mixed += kept
        divisor.add_(torch.sign(kept), alpha=weight[i])  # sign(kept) is 1 where model i agrees, else 0
    divisor[divisor == 0] = 1
    return mixed.mul_(sign), divisor


# name -> (sparsifier, consensus, defaults, paper); each entry hides the settings its sparsifier does not read.
TASK_ARITHMETIC_FAMILY = {
    "task_arithmetic": ("none", "none", {}, "Editing models with task arithmetic https://arxiv.org/abs/2212.04089"),
    "ties": ("magnitude", "sum", {"normalize": True}, "TIES-Merging https://arxiv.org/abs/2306.01708"),
    "dare_linear": ("bernoulli", "none", {"rescale": True}, "DARE https://arxiv.org/abs/2311.03099"),
    "dare_ties": ("bernoulli", "sum", {"rescale": True}, "DARE https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("outliers", "none", {}, "Model Breadcrumbs https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("outliers", "sum", {}, "Model Breadcrumbs https://arxiv.org/abs/2312.06795"),
    "della": ("della", "sum", {"normalize": True, "rescale": True}, "DELLA https://arxiv.org/abs/2406.11617"),
    "della_linear": ("della", "none", {"rescale": True}, "DELLA https://arxiv.org/abs/2406.11617"),
}
_READS = {"none": (), "magnitude": ("density",), "outliers": ("density", "gamma"),
          "bernoulli": ("density", "seed"), "della": ("density", "epsilon", "seed")}

for _name, (_sparsifier, _consensus, _defaults, _paper) in TASK_ARITHMETIC_FAMILY.items():
    _unread = tuple(k for k in ("density", "gamma", "epsilon", "seed") if k not in _READS[_sparsifier])
    merge_method(_name, paper=_paper, defaults={**_defaults, "sparsifier": _sparsifier, "consensus": _consensus},
                 hide=("sparsifier", "consensus", *_unread))(task_arithmetic_family)


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors as flat vectors (lerp when nearly collinear); float32 or float64."""
    dtype = _work_dtype(v0)
    a, b = v0.to(dtype), v1.to(dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).to(v0.dtype)
    theta = math.acos(dot)
    s = math.sin(theta)
    return (a * (math.sin((1 - t) * theta) / s) + b * (math.sin(t * theta) / s)).to(v0.dtype)


@merge_method("slerp", paper="Spherical linear interpolation (Shoemake, 1985)", models=(1, 1))
def slerp(tensors: list[Tensor], base: Tensor, *, t: float) -> Tensor:
    return slerp_vectors(t, base, tensors[0])


def _unit(x: Tensor, eps: float = 1e-7) -> Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """Slerp along the last axis (rows of the transposed tensor when row-wise, or the flat tensor)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method("nuslerp", paper="mergekit's NuSLERP https://github.com/arcee-ai/mergekit", models=(2, 2))
def nuslerp(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float] = 1.0,
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return nuslerp_vectors(t, tensors[0], tensors[1], nuslerp_row_wise, nuslerp_flatten)
    tau = nuslerp_vectors(t, tensors[0] - base, tensors[1] - base, nuslerp_row_wise, nuslerp_flatten)
    return base + tau


@merge_method("multislerp", paper="Multi-SLERP https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float] = 1.0,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(tensors), -1)
    w = torch.tensor(weight, dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2 or not norms.any():  # opposite pair, or no change at all: interpolate linearly
            out = (stacked * w.reshape(-1, *([1] * (stacked.ndim - 1)))).sum(0)
            return out if base is None else out + base
        raise DeltatuneError("multislerp: the weighted directions cancel out (antipodal inputs with balancing "
                             "weights); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w[:, None]).sum(0)
    step_norm = torch.norm(step) + eps
    out = (mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(tensors[0].shape)
    return out if base is None else out + base


@merge_method("karcher", paper="Karcher mean on the hypersphere https://arxiv.org/abs/2603.04972", models=(1, None))
def karcher(tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = _work_dtype(tensors[0])
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [(tensors[i].to(dtype) / norms[i]).reshape(-1) for i in valid]
    alpha = 1.0 / len(valid)
    mean = sum(alpha * u for u in units)
    mean = units[0].clone() if torch.linalg.vector_norm(mean) < tol else mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        mean = mean / torch.linalg.vector_norm(mean) if torch.linalg.vector_norm(mean) > tol else mean
    scale = sum(norms) / len(tensors)
    return (scale * mean).reshape(tensors[0].shape).to(tensors[0].dtype)


@merge_method("model_stock", paper="Model Stock https://arxiv.org/abs/2403.19522", models=(2, None))
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.ndim == 1 else base
        ws = [t.unsqueeze(0) if t.ndim == 1 else t for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # opposing updates: keep the base rather than amplify them
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@merge_method("sce", paper="FuseChat / SCE https://arxiv.org/abs/2408.07990")
def sce(tensors: list[Tensor], base: Tensor, *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    taus = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        taus *= _variance_mask(taus, select_topk)
    agree = sign_consensus(taus, "sum").to(taus.dtype)
    energy = taus.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * base.ndim)) * agree
    return base + (taus * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


def _variance_mask(taus: Tensor, density: float) -> Tensor:
    """Entries whose variance across models is among the top `density` fraction of the non-zero ones."""
    if density <= 0:
        return torch.zeros_like(taus[0])
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k).indices] = 1
    return mask


@merge_method("nearswap", paper="NearSwap https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", models=(1, 1))
def nearswap(tensors: list[Tensor], base: Tensor, *, t: float) -> Tensor:
    other = tensors[0]
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


@merge_method("passthrough", paper="mergekit passthrough (layer stacking) https://arxiv.org/abs/2403.13257",
              models=(1, 1))
def passthrough(tensors: list[Tensor], *, scale: float | None = None) -> Tensor:
    return tensors[0] if scale is None else tensors[0] * scale
