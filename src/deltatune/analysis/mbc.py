"""MBC: cluster stored adapters by the similarity of their parameters, and report the clusters.

"Towards Modular LLMs by Building and Reusing a Library of LoRAs" (Ostapenko et al., 2024,
https://arxiv.org/abs/2405.11157) groups tasks by the cosine similarity of their adapters' flattened parameters
(model-based clustering) and trains one adapter per cluster. Two similarities are offered:

- "params": cosine of the flattened stored tensors (MBC's definition). Needs one parameter layout (same method,
  targets and ranks); factored adapters are only comparable when they share their initialisation (e.g. the same
  seed for LoRA's A).
- "delta": cosine of the full updates ΔW concatenated over modules, computed through the contract against a base
  model: invariant to factorisation, and comparable across methods.

Clustering is spherical k-means on an exact embedding of the cosine matrix (eigen-decomposition; rows reproduce the
cosines), k-means++ seeding with restarts; k is chosen by the best silhouette when not given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.errors import DeltatuneError
from .deltas import loaded_delta_set
from .library import loaded
from .store import AdapterStore

MAX_AUTO_K = 8


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0)


def params_similarity(store: AdapterStore, entries: list[dict], groups: Sequence[str] | None) -> torch.Tensor:
    """Cosine matrix of the flattened stored tensors (one layout required)."""
    vectors, layouts = [], {}
    for entry in entries:
        tensors = store.tensors(entry["name"], groups)
        layout = tuple((k, tuple(t.shape)) for k, t in sorted(tensors.items()))
        layouts.setdefault(layout, []).append(entry["name"])
        vectors.append(torch.cat([tensors[k].double().reshape(-1) for k, _ in layout]))
    if len(layouts) > 1:
        groups_text = "; ".join(", ".join(names[:3]) for names in layouts.values())
        raise DeltatuneError(f"the adapters have {len(layouts)} different parameter layouts ({groups_text}); "
                             "filter with --method / --base, or cluster by ΔW with --by delta --base MODEL")
    stacked = torch.stack(vectors)
    return cosine_from_gram(stacked @ stacked.T)


def delta_similarity(store: AdapterStore, model: nn.Module, entries: list[dict],
                     groups: Sequence[str] | None) -> torch.Tensor:
    """Cosine matrix of the full ΔW (all modules concatenated), one module at a time."""
    n = len(entries)
    gram = torch.zeros(n, n, dtype=torch.float64)
    with loaded(store, model, entries, groups) as names:
        sets = [loaded_delta_set(model, name, entry["name"]) for name, entry in zip(names, entries)]
        for path in sorted({p for s in sets for p in s.paths}):
            rows = [s.get(path).delta.double().reshape(-1) if path in s.paths else None for s in sets]
            size = next(r.numel() for r in rows if r is not None)
            stacked = torch.stack([r if r is not None else torch.zeros(size, dtype=torch.float64) for r in rows])
            gram += stacked @ stacked.T
    return cosine_from_gram(gram)


def _embedding(cos: torch.Tensor) -> torch.Tensor:
    """Rows whose dot products are the cosines (unit rows)."""
    values, vectors = torch.linalg.eigh(cos)
    points = vectors * values.clamp(min=0).sqrt()
    return torch.nn.functional.normalize(points, dim=1)


def spherical_kmeans(points: torch.Tensor, k: int, seed: int = 0, restarts: int = 8, steps: int = 50) -> list[int]:
    """Labels of unit rows under cosine k-means (k-means++ seeding, best of `restarts`)."""
    generator = torch.Generator().manual_seed(seed)
    best, best_score = None, -float("inf")
    for _ in range(restarts):
        centres = [points[int(torch.randint(len(points), (1,), generator=generator))]]
        while len(centres) < k:
            gap = (1 - (points @ torch.stack(centres).T).max(dim=1).values).clamp(min=0)
            pick = torch.multinomial(gap + 1e-12, 1, generator=generator) if gap.sum() > 0 else \
                torch.randint(len(points), (1,), generator=generator)
            centres.append(points[int(pick)])
        centres = torch.stack(centres)
        for _ in range(steps):
            labels = (points @ centres.T).argmax(dim=1)
            moved = torch.stack([torch.nn.functional.normalize(points[labels == c].sum(0), dim=0)
                                 if (labels == c).any() else centres[c] for c in range(k)])
            if torch.allclose(moved, centres):
                break
            centres = moved
        score = float((points * centres[labels]).sum())
        if score > best_score:
            best, best_score = labels.tolist(), score
    return best


def silhouette(cos: torch.Tensor, labels: list[int]) -> float:
    """Mean silhouette with distance 1 − cosine (singleton clusters score 0)."""
    dist = 1 - cos
    labels_t = torch.tensor(labels)
    scores = []
    for i, label in enumerate(labels):
        same = (labels_t == label)
        same[i] = False
        if not same.any():
            scores.append(0.0)
            continue
        inside = float(dist[i, same].mean())
        outside = min(float(dist[i, labels_t == other].mean()) for other in set(labels) if other != label)
        scores.append((outside - inside) / max(inside, outside, 1e-12))
    return sum(scores) / len(scores)


def cluster_matrix(cos: torch.Tensor, names: list[str], k: int | None = None, seed: int = 0) -> dict:
    """Clusters of the adapters whose cosine matrix is `cos`."""
    n = len(names)
    if k is not None and not 1 <= k <= n:
        raise DeltatuneError(f"k must be between 1 and the number of adapters ({n}), got {k}")
    points = _embedding(cos)
    if k is None:
        options = range(2, min(MAX_AUTO_K, n - 1) + 1)
        fits = [(silhouette(cos, labels), labels) for labels in (spherical_kmeans(points, c, seed) for c in options)]
        score, labels = max(fits, key=lambda fit: fit[0]) if fits else (0.0, [0] * n)
    else:
        labels = spherical_kmeans(points, k, seed)
        score = silhouette(cos, labels) if len(set(labels)) > 1 else 0.0
    clusters = []
    for label in sorted(set(labels), key=labels.index):
        members = [i for i, lab in enumerate(labels) if lab == label]
        pairs = [float(cos[i, j]) for i in members for j in members if i < j]
        clusters.append({"members": [names[i] for i in members],
                         "mean_similarity": sum(pairs) / len(pairs) if pairs else 1.0})
    return {"k": len(clusters), "silhouette": score, "clusters": clusters, "adapters": names,
            "similarity": [[round(float(v), 4) for v in row] for row in cos]}


def cluster(store: AdapterStore, *, k: int | None = None, by: str = "params", model: nn.Module | None = None,
            groups: Sequence[str] | None = None, base_model: str | None = None, method: str | None = None,
            seed: int = 0) -> dict:
    """MBC over the store entries visible to `groups` (optionally one base model / method)."""
    entries = store.list(groups=groups, base_model=base_model, method=method)
    if len(entries) < 2:
        raise DeltatuneError(f"clustering needs at least two adapters; {len(entries)} match the filters")
    if by == "params":
        cos = params_similarity(store, entries, groups)
    elif by == "delta":
        if model is None:
            raise DeltatuneError("clustering by ΔW needs the base model: pass --base MODEL")
        cos = delta_similarity(store, model, entries, groups)
    else:
        raise DeltatuneError(f"unknown similarity {by!r}; valid: params, delta")
    return {"by": by, **cluster_matrix(cos, [e["name"] for e in entries], k, seed)}
