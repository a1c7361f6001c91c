"""Pure tensor functions shared by the task-arithmetic family: sparsifiers, rescaling and sign consensus.

A sparsifier returns a 0/1 mask for one task vector τ = θ − θ_base:
- magnitude (TIES): the top `density` fraction by |τ| (at least one entry when density > 0);
- outliers (Model Breadcrumbs): drop the top `gamma` fraction by |τ| and then the smallest, keeping `density`;
- bernoulli (DARE): each entry kept with probability `density`;
- della (DELLA's MagPrune): keep probability rises linearly with the entry's magnitude rank within its row, from
  density − ε (smallest) to density + ε (largest).
`rescale_l1` rescales a masked τ to the L1 norm of the unmasked one (DARE's 1/p in expectation, exact per tensor,
as mergekit does). `sign_consensus` is TIES's "elect sign": per entry, the sign of the (weighted) sum wins.

Selecting exactly k entries uses a sampled band and one small `kthvalue`, not a full sort: a sort of a 28M-entry
embedding takes seconds, the band a few linear passes. Ties at the threshold are broken by position.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIRECT_LIMIT = 1 << 15  # below this many entries kthvalue on the whole tensor is fast enough
_SAMPLE = 1 << 14


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, as a 0-d tensor."""
    n = values.numel()
    if n <= _DIRECT_LIMIT:
        return torch.kthvalue(values, k).values
    # a seeded random sample: a strided one could alias the rows of a weight matrix
    picks = torch.randint(0, n, (_SAMPLE,), generator=torch.Generator().manual_seed(n), device=values.device)
    sample = torch.sort(values[picks]).values
    m = sample.numel()
    margin = 4 * int(m**0.5) + 8  # many standard deviations of the sample rank of the true k-th value
    pos = (k - 1) * m / n
    lo_value = sample[max(0, int(pos) - margin)]
    hi_value = sample[min(m - 1, int(pos) + margin)]
    inside = values >= lo_value
    below = n - int(torch.count_nonzero(inside))
    if lo_value == hi_value:  # half-precision updates tie a lot: the band is one value
        count = int(torch.count_nonzero(values == lo_value))
        if below < k <= below + count:
            return lo_value
    inside &= values <= hi_value
    band = values[inside]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(values, k).values  # the sample missed (adversarial data): exact fallback


def smallest_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask (flat) of exactly the k smallest entries; ties at the threshold go to the earlier positions."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = kth_smallest(values, k)
    mask = values < threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (values == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask


def rank_window_mask(scores: Tensor, lo: int, hi: int) -> Tensor:
    """Mask (shape of `scores`) of entries whose ascending rank by score lies in [lo, hi)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    mask = smallest_mask(flat, hi) if hi < n else torch.ones(n, dtype=torch.bool, device=flat.device)
    if lo > 0:
        mask &= ~smallest_mask(flat, lo)
    return mask.reshape(scores.shape)


def _magnitudes(tau: Tensor) -> Tensor:
    return tau.abs().float() if tau.dtype != torch.float64 else tau.abs()


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Keep the top `density` fraction of entries by magnitude (at least one when density > 0)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    k = max(1, int(density * n))
    magnitudes = _magnitudes(tau).reshape(-1)
    threshold = kth_smallest(magnitudes, n - k + 1)  # the k-th largest
    keep = magnitudes >= threshold
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # ties at the threshold: the earlier positions stay
        keep[(magnitudes == threshold).nonzero().squeeze(1)[-extra:]] = False
    return keep.reshape(tau.shape)


def outliers_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest `gamma` fraction, then the smallest, keeping a `density` fraction."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)  # fewer outliers are dropped when density leaves no room for all of them
    return rank_window_mask(_magnitudes(tau), bottom, bottom + keep)


def bernoulli_mask(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: each entry kept independently with probability `density`."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    return torch.rand(tau.shape, generator=generator, device=tau.device) < density


def della_mask(tau: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """DELLA MagPrune: keep probability density − ε + 2ε·(rank within the row / (columns − 1))."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
    columns = rows.shape[1]
    ranks = _magnitudes(rows).argsort(dim=1).argsort(dim=1).float()
    rank_norm = ranks / (columns - 1) if columns > 1 else torch.full_like(ranks, 0.5)
    probability = (density - epsilon) + 2 * epsilon * rank_norm
    return (torch.rand(rows.shape, generator=generator, device=tau.device) < probability).reshape(tau.shape)


def rescale_l1(tau: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """`masked` scaled in place so its L1 norm equals that of `tau` (left as is when either norm is ~0)."""
    before = tau.abs().sum()
    after = masked.abs().sum()
    if before >= eps and after >= eps:
        masked.mul_(before / after)
    return masked


def elected_sign(deltas: Tensor, method: str = "sum") -> Tensor:
    """TIES's "elect sign" over stacked (n, ...) deltas, as ±1 per entry: the sign of the sum ("sum") or the sign
    held by more models ("count"); a zero total elects +.

    copysign(1, total) is + for a total of +0.0; a total of −0.0 needs every delta to be zero there, where no model
    agrees with either sign, so the choice cannot change a result."""
    total = deltas[0].clone() if method == "sum" else torch.sign(deltas[0])
    for delta in deltas[1:]:  # a running sum: reducing over the leading axis of a stack is a slow strided pass
        total += delta if method == "sum" else torch.sign(delta)
    return torch.copysign(torch.ones_like(total), total)


def sign_consensus(deltas: Tensor, method: str = "sum") -> Tensor:
    """Bool mask (n, ...) of the entries agreeing with the elected sign (zero entries never agree)."""
    return (deltas * elected_sign(deltas, method)) > 0
