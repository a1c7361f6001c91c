"""Merge methods on LoRA factors: each takes [(A, B), ...] (A: r × fan_in, B: out × r, ΔW = B·A) and returns one
(A, B). Ranks may differ between inputs (heterogeneous clients are zero-padded to the largest rank where the
method averages factors entry by entry).

- fedavg — FedAvg of the factors (https://arxiv.org/abs/1602.05629): A = Σ wᵢAᵢ, B = Σ wᵢBᵢ (weights normalised).
- fedsa — FedSA-LoRA (https://arxiv.org/abs/2410.01463): only A is shared and averaged; B stays the client's own
  (`client` picks whose).
- fedsvd — FedSVD (https://arxiv.org/abs/2505.12805): the exact average update Σ wᵢBᵢAᵢ re-factorised by SVD,
  A = Vᵀ (orthonormal rows), B = U·Σ, at the largest client rank (or `rank`).
- lora_fair — LoRA-FAIR (https://arxiv.org/abs/2411.14961): averaged A and B plus a server-side correction ΔB
  minimising ‖Σ wᵢBᵢAᵢ − (B̄ + ΔB)Ā‖² + reg·‖ΔB‖², so the product matches the average update.
- lora_lego — LoRA-LEGO (https://arxiv.org/abs/2409.16167): every rank-one unit (bⱼ, aⱼ) of every LoRA is a
  Minimal Semantic Unit; units are sign-aligned, clustered by k-means on their unit-norm [a; b], and each cluster
  becomes one unit with a = the normalised mean direction and b = Σⱼ bⱼ·(aⱼ·a) (each member's output along a:
  our reading of the paper's reweighting). The merged LoRA has rank k (`rank`, default the largest input rank).
- eigenlorax — EigenLoRAx (https://arxiv.org/abs/2502.04700): the principal subspaces of all inputs' A rows and
  B columns (top `rank`), and the weighted sum of the updates expressed in them: A = Vₖᵀ, B = Uₖ·Σᵢ wᵢ(UₖᵀBᵢ)(AᵢVₖ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import concatenate, truncate_factored
from .registry import PerModel, merge_method

Factors = list[tuple[Tensor, Tensor]]


def _normalised(weight: list[float]) -> list[float]:
    total = sum(weight)
    return [w / total for w in weight] if abs(total) > 1e-12 else list(weight)


def _padded(factors: Factors) -> tuple[Tensor, Tensor]:
    """Stacks (n, R, fan_in) and (n, out, R), zero-padded to the largest rank R."""
    rank = max(a.shape[0] for a, _ in factors)
    a_stack = torch.zeros(len(factors), rank, factors[0][0].shape[1], dtype=torch.float64)
    b_stack = torch.zeros(len(factors), factors[0][1].shape[0], rank, dtype=torch.float64)
    for i, (a, b) in enumerate(factors):
        a_stack[i, : a.shape[0]] = a
        b_stack[i, :, : b.shape[1]] = b
    return a_stack, b_stack


def _weighted(stack: Tensor, weight: list[float]) -> Tensor:
    return (stack * torch.tensor(weight, dtype=stack.dtype).reshape(-1, 1, 1)).sum(0)


@merge_method("fedavg", paper="FedAvg (McMahan et al., 2017) https://arxiv.org/abs/1602.05629")
def fedavg(factors: Factors, *, weight: PerModel[float] = 1.0) -> tuple[Tensor, Tensor]:
    a, b = _padded(factors)
    w = _normalised(weight)
    return _weighted(a, w).float(), _weighted(b, w).float()


@merge_method("fedsa", paper="FedSA-LoRA (Guo et al., 2024) https://arxiv.org/abs/2410.01463")
def fedsa(factors: Factors, *, weight: PerModel[float] = 1.0, client: int = 0) -> tuple[Tensor, Tensor]:
    a, b = _padded(factors)
    return _weighted(a, _normalised(weight)).float(), b[min(client, len(factors) - 1)].float()


@merge_method("fedsvd", paper="FedSVD (2025) https://arxiv.org/abs/2505.12805")
def fedsvd(factors: Factors, *, weight: PerModel[float] = 1.0, rank: int | None = None) -> tuple[Tensor, Tensor]:
    a, b = concatenate([(a.double(), b.double()) for a, b in factors], _normalised(weight))
    low = truncate_factored(a, b, rank or max(f[0].shape[0] for f in factors), orthonormal_a=True)
    return low.a.float(), low.b.float()


@merge_method("lora_fair", paper="LoRA-FAIR (Bian et al., 2024) https://arxiv.org/abs/2411.14961")
def lora_fair(factors: Factors, *, weight: PerModel[float] = 1.0, reg: float = 1e-3) -> tuple[Tensor, Tensor]:
    w = _normalised(weight)
    a_stack, b_stack = _padded(factors)
    a_bar, b_bar = _weighted(a_stack, w), _weighted(b_stack, w)
    gram = a_bar @ a_bar.t()
    # (Σ wᵢBᵢAᵢ − B̄Ā)Āᵀ computed through the factors, never forming ΔW
    residual = sum(wi * bi @ (ai @ a_bar.t()) for wi, ai, bi in zip(w, a_stack, b_stack)) - b_bar @ gram
    correction = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), residual.t()).t()
    return a_bar.float(), (b_bar + correction).float()


def _kmeans(points: Tensor, k: int, iterations: int, seed: int) -> Tensor:
    """Cluster index per row (cosine k-means on unit rows; farthest-point initial centroids from a seeded start)."""
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(points.shape[0], (1,), generator=g))]
    while len(chosen) < k:
        closeness = (points @ points[chosen].t()).max(1).values
        closeness[chosen] = float("inf")
        chosen.append(int(closeness.argmin()))
    centroids = points[chosen].clone()
    labels = torch.zeros(points.shape[0], dtype=torch.long)
    for _ in range(iterations):
        labels = (points @ centroids.t()).argmax(1)
        for c in range(k):
            members = points[labels == c]
            if members.numel():
                centroids[c] = members.mean(0) / members.mean(0).norm().clamp(min=1e-12)
    return labels


@merge_method("lora_lego", paper="LoRA-LEGO (Zhao et al., 2024) https://arxiv.org/abs/2409.16167")
def lora_lego(factors: Factors, *, weight: PerModel[float] = 1.0, rank: int | None = None, iterations: int = 25,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    units_a = torch.cat([a.double() for a, _ in factors])  # (Σr, fan_in)
    units_b = torch.cat([w * b.double() for (_, b), w in zip(factors, weight)], dim=1).t()  # (Σr, out)
    flip = torch.sign(units_a.gather(1, units_a.abs().argmax(1, keepdim=True)))  # (b, a) ~ (−b, −a)
    units_a, units_b = units_a * flip, units_b * flip
    k = min(rank or max(a.shape[0] for a, _ in factors), units_a.shape[0])
    features = torch.cat([units_a / units_a.norm(dim=1, keepdim=True).clamp(min=1e-12),
                          units_b / units_b.norm(dim=1, keepdim=True).clamp(min=1e-12)], dim=1)
    labels = _kmeans(features / 2**0.5, k, iterations, seed)
    a_out = torch.zeros(k, units_a.shape[1], dtype=torch.float64)
    b_out = torch.zeros(units_b.shape[1], k, dtype=torch.float64)
    for c in range(k):
        members = labels == c
        if not members.any():
            continue
        direction = (units_a[members] / units_a[members].norm(dim=1, keepdim=True).clamp(min=1e-12)).mean(0)
        direction = direction / direction.norm().clamp(min=1e-12)
        a_out[c] = direction
        b_out[:, c] = (units_b[members] * (units_a[members] @ direction)[:, None]).sum(0)
    return a_out.float(), b_out.float()


@merge_method("eigenlorax", paper="EigenLoRAx (Kaushik et al., 2025) https://arxiv.org/abs/2502.04700")
def eigenlorax(factors: Factors, *, weight: PerModel[float] = 1.0, rank: int | None = None) -> tuple[Tensor, Tensor]:
    k = rank or max(a.shape[0] for a, _ in factors)
    rows = torch.cat([a.double() for a, _ in factors])  # every adapter's A rows
    cols = torch.cat([b.double() for _, b in factors], dim=1)  # every adapter's B columns
    v = torch.linalg.svd(rows, full_matrices=False)[2][:k].t()  # (fan_in, k)
    u = torch.linalg.svd(cols, full_matrices=False)[0][:, :k]  # (out, k)
    core = sum(w * (u.t() @ b.double()) @ (a.double() @ v) for (a, b), w in zip(factors, weight))
    return v.t().contiguous().float(), (u @ core).float()
