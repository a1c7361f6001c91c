"""Merge methods from the papers, each a pure function of one tensor from every model (τᵢ = θᵢ − θ_base).

- lines — LiNeS (https://arxiv.org/abs/2410.17146): the task-arithmetic sum scaled by depth,
  λ(ℓ) = α + β·ℓ/(L−1); tensors outside the layer stack get α.
- pcb — PCB-Merging (https://arxiv.org/abs/2410.02396): intra-balancing softmax(N·norm(τᵢ²)), inter-balancing
  Σⱼ softmax(norm(τᵢ·τⱼ)), the product β drops all but the top `density` fraction per model, then
  Σ βᵢτᵢ / Σ βᵢ scaled by λ. norm is a z-score over the tensor, softmax runs over the tensor's entries (our
  reading of the paper's equations).
- iso_c / iso_cts — "No Task Left Behind" (https://arxiv.org/abs/2502.04959): the SVD of Σ τᵢ with its spectrum
  flattened to the mean singular value (Iso-C); Iso-CTS keeps the top `common` fraction of that subspace and fills
  the rest with each task's top directions outside it, orthogonalised, before flattening.
- tsv — Task Singular Vectors (https://arxiv.org/abs/2412.00081): each τᵢ's top rank/N singular triplets,
  concatenated, with U and V orthogonalised (closest orthogonal matrix) to remove interference.
- sequential — sequential projection merging ("Merging Models on the Fly", https://arxiv.org/abs/2501.09522):
  models enter one at a time; each τ is projected off the subspace the merged update already spans (left and
  right singular directions holding `energy` of it), added, and the sum rescaled to the mean task-vector norm.
  It keeps one running update, whatever the number of models.
- fisher — Fisher-weighted averaging (https://arxiv.org/abs/2111.09832): Σ wᵢFᵢθᵢ / Σ wᵢFᵢ with diagonal Fisher
  Fᵢ (see `statistics.diagonal_fisher`), falling back to the plain average where every Fᵢ is 0.
- regmean — RegMean (https://arxiv.org/abs/2212.09849): for a linear weight with input Gram matrices Gᵢ = XᵢᵀXᵢ,
  W = (Σ WᵢG̃ᵢ)(Σ G̃ᵢ)⁻¹ with G̃ = α·G + (1−α)·diag(G); other tensors are averaged.
Matrices are the tensors with two or more dimensions (flattened after the first); vectors fall back to the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import PerModel, TensorInfo, merge_method


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).double()


def _orthogonal(m: Tensor) -> Tensor:
    """The closest matrix with orthonormal columns (polar factor): U·Vᵀ of m's thin SVD."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _mean_task_vector(tensors: list[Tensor], base: Tensor) -> Tensor:
    return sum(t.double() - base.double() for t in tensors) / len(tensors)


@merge_method("lines", paper="LiNeS (Wang et al., 2024) https://arxiv.org/abs/2410.17146")
def lines(tensors: list[Tensor], base: Tensor, *, alpha: float, beta: float, weight: PerModel[float] = 1.0,
          info: TensorInfo) -> Tensor:
    tau = sum(w * (t.double() - base.double()) for t, w in zip(tensors, weight))
    scale = alpha + beta * info.depth if info.layer is not None else alpha
    return (base.double() + scale * tau).to(base.dtype)


def _zscore(x: Tensor) -> Tensor:
    return (x - x.mean()) / x.std().clamp(min=1e-12) if x.numel() > 1 else torch.zeros_like(x)


@merge_method("pcb", paper="PCB-Merging (Du et al., 2024) https://arxiv.org/abs/2410.02396", models=(1, None))
def pcb(tensors: list[Tensor], base: Tensor, *, density: float = 0.2, lambda_: float = 1.0) -> Tensor:
    taus = [(t.double() - base.double()).reshape(-1) for t in tensors]
    n = len(taus)
    betas = []
    for tau_i in taus:
        intra = torch.softmax(n * _zscore(tau_i * tau_i), dim=0)
        inter = sum(torch.softmax(_zscore(tau_i * tau_j), dim=0) for tau_j in taus)
        beta = intra * inter
        keep = max(1, int(density * beta.numel())) if density > 0 else 0
        mask = torch.zeros_like(beta, dtype=torch.bool)
        mask[torch.topk(beta, keep).indices] = True
        betas.append(beta * mask)
    total = sum(betas)
    merged = sum(b * t for b, t in zip(betas, taus)) / torch.where(total > 0, total, torch.ones_like(total))
    return (base.double() + lambda_ * merged.reshape(base.shape)).to(base.dtype)


@merge_method("iso_c", paper="Iso-C, No Task Left Behind (Marczak et al., 2025) https://arxiv.org/abs/2502.04959")
def iso_c(tensors: list[Tensor], base: Tensor, *, alpha: float = 1.0) -> Tensor:
    if base.ndim < 2:
        return (base.double() + alpha * _mean_task_vector(tensors, base)).to(base.dtype)
    total = sum(_matrix(t) - _matrix(base) for t in tensors)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    iso = s.mean() * (u @ vh)
    return (base.double() + alpha * iso.reshape(base.shape)).to(base.dtype)


@merge_method("iso_cts", paper="Iso-CTS, No Task Left Behind (Marczak et al., 2025) https://arxiv.org/abs/2502.04959")
def iso_cts(tensors: list[Tensor], base: Tensor, *, alpha: float = 1.0, common: float = 0.8) -> Tensor:
    if base.ndim < 2:
        return (base.double() + alpha * _mean_task_vector(tensors, base)).to(base.dtype)
    taus = [_matrix(t) - _matrix(base) for t in tensors]
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    rank = s.numel()
    k = max(1, int(common * rank))
    per_task = (rank - k) // len(taus)
    lefts, rights = [u[:, :k]], [vh[:k].t()]
    if per_task > 0:
        project_out = torch.eye(u.shape[0], dtype=u.dtype) - u[:, :k] @ u[:, :k].t()
        for tau in taus:
            ui, _, vhi = torch.linalg.svd(project_out @ tau, full_matrices=False)
            lefts.append(ui[:, :per_task])
            rights.append(vhi[:per_task].t())
    left, right = _orthogonal(torch.cat(lefts, 1)), _orthogonal(torch.cat(rights, 1))
    iso = s[:left.shape[1]].mean() * (left @ right.t())
    return (base.double() + alpha * iso.reshape(base.shape)).to(base.dtype)


@merge_method("tsv", paper="Task Singular Vectors (Gargiulo et al., 2025) https://arxiv.org/abs/2412.00081")
def tsv(tensors: list[Tensor], base: Tensor, *, alpha: float = 1.0) -> Tensor:
    if base.ndim < 2:
        return (base.double() + alpha * _mean_task_vector(tensors, base)).to(base.dtype)
    taus = [_matrix(t) - _matrix(base) for t in tensors]
    k = max(1, min(taus[0].shape) // len(taus))
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        keep = min(k, int((s > 1e-12 * s[0].clamp(min=1e-300)).sum()))  # null directions would skew the polar step
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].t())
    merged = _orthogonal(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _orthogonal(torch.cat(vs, 1)).t()
    return (base.double() + alpha * merged.reshape(base.shape)).to(base.dtype)


def _subspace(m: Tensor, energy: float) -> tuple[Tensor, Tensor]:
    """Left and right singular vectors holding an `energy` fraction of m's squared singular values."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    squares = s.square()
    k = int((torch.cumsum(squares, 0) / squares.sum().clamp(min=1e-300) < energy).sum()) + 1
    return u[:, :k], vh[:k].t()


@merge_method("sequential", paper="Merging Models on the Fly (Tang et al., 2025) https://arxiv.org/abs/2501.09522")
def sequential(tensors: list[Tensor], base: Tensor, *, energy: float = 0.9, lambda_: float = 1.0) -> Tensor:
    merged = None
    norms = 0.0
    for t in tensors:  # one model at a time: only the running update is kept
        tau = _matrix(t) - _matrix(base) if base.ndim >= 2 else (t.double() - base.double()).reshape(1, -1)
        norms += float(tau.norm())
        if merged is None:
            merged = tau
            continue
        if float(merged.norm()) > 0:
            left, right = _subspace(merged, energy)
            tau = tau - left @ (left.t() @ tau)
            tau = tau - (tau @ right) @ right.t()
        merged = merged + tau
    target = norms / len(tensors)
    size = float(merged.norm())
    merged = merged * (target / size) if size > 0 else merged
    return (base.double() + lambda_ * merged.reshape(base.shape)).to(base.dtype)


@merge_method("fisher", paper="Fisher-weighted averaging (Matena & Raffel, 2022) https://arxiv.org/abs/2111.09832")
def fisher(tensors: list[Tensor], base: Tensor | None, statistics: list[Tensor | None], *,
           weight: PerModel[float] = 1.0, eps: float = 1e-12) -> Tensor:
    if any(f is None for f in statistics):  # no Fisher for this tensor: the weighted average
        return (sum(w * t.double() for t, w in zip(tensors, weight)) / sum(weight)).to(tensors[0].dtype)
    numerator = sum(w * f.double() * t.double() for t, f, w in zip(tensors, statistics, weight))
    denominator = sum(w * f.double() for f, w in zip(statistics, weight))
    average = sum(w * t.double() for t, w in zip(tensors, weight)) / sum(weight)
    merged = torch.where(denominator > eps, numerator / denominator.clamp(min=eps), average)
    return merged.to(tensors[0].dtype)


@merge_method("regmean", paper="RegMean (Jin et al., 2023) https://arxiv.org/abs/2212.09849")
def regmean(tensors: list[Tensor], base: Tensor | None, statistics: list[Tensor | None], *,
            alpha: float = 0.9) -> Tensor:
    if tensors[0].ndim != 2 or any(g is None for g in statistics):
        return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)
    grams = []
    for g in statistics:
        g = g.double()
        grams.append(alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)))
    left = sum(w.double() @ g for w, g in zip(tensors, grams))  # (out, in)
    merged = torch.linalg.solve(sum(grams), left.t()).t()  # left · (Σ G)⁻¹; Σ G is symmetric
    return merged.to(tensors[0].dtype)
