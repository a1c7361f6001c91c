"""Sparsifiers, rescaling and sign election as pure functions; randomised methods are seeded and reproducible."""

from __future__ import annotations

import torch

from deltatune.merging import get_merge_method
from deltatune.merging.registry import TensorInfo
from deltatune.merging.sparsify import (
    bernoulli_mask,
    della_mask,
    magnitude_mask,
    rank_window_mask,
    rescale_l1,
    sign_consensus,
    smallest_mask,
)


def test_selection_on_large_tensors_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3_000_000, generator=g).abs()
    order = values.argsort()
    for k in (1, 12345, 1_500_000, 2_999_999):
        mask = smallest_mask(values, k)
        assert int(mask.sum()) == k
        expected = torch.zeros_like(mask)
        expected[order[:k]] = True
        assert torch.equal(mask, expected)


def test_ties_at_the_threshold_keep_exactly_k():
    values = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 2.0])
    assert smallest_mask(values, 3).tolist() == [False, True, True, False, True, False]
    assert rank_window_mask(values, 1, 4).sum() == 3


def test_magnitude_keeps_the_largest_fraction():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05])
    assert magnitude_mask(tau, 0.25).tolist() == [False, True, False, True, False, False, False, False]
    assert magnitude_mask(tau, 0.01).sum() == 1  # at least one entry
    assert magnitude_mask(tau, 0).sum() == 0 and magnitude_mask(tau, 1).all()


def test_rescale_matches_l1_norm():
    tau = torch.randn(1000)
    masked = tau * (torch.rand(1000) < 0.3)
    rescaled = rescale_l1(tau, masked.clone())
    torch.testing.assert_close(rescaled.abs().sum(), tau.abs().sum())


def test_sign_consensus_elects_the_sign_of_the_sum():
    deltas = torch.tensor([[1.0, -1.0, 0.0], [-3.0, -1.0, 2.0], [1.0, 4.0, 0.0]])
    agree = sign_consensus(deltas, "sum")  # sums: -1 (neg), 2 (pos), 2 (pos)
    assert agree.tolist() == [[False, False, False], [True, False, True], [False, True, False]]
    assert sign_consensus(deltas, "count")[:, 0].tolist() == [True, False, True]  # two positives win


def test_random_masks_are_reproducible_and_have_the_right_density():
    # tau's own generator: drawn from the stream the masks use (seed 0 here), tau and the mask draws would correlate
    tau = torch.randn(200, 500, generator=torch.Generator().manual_seed(123))
    a = bernoulli_mask(tau, 0.3, torch.Generator().manual_seed(1))
    b = bernoulli_mask(tau, 0.3, torch.Generator().manual_seed(1))
    c = bernoulli_mask(tau, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.3) < 0.01
    keep = della_mask(tau, 0.5, 0.2, torch.Generator().manual_seed(0))
    magnitude_rank = tau.abs().argsort(dim=1).argsort(dim=1)
    small, large = keep[magnitude_rank < 50].float().mean(), keep[magnitude_rank >= 450].float().mean()
    assert abs(small - 0.31) < 0.03 and abs(large - 0.69) < 0.03  # p rises from density-ε to density+ε


def test_dare_is_seeded_per_tensor_and_unbiased():
    base = torch.zeros(400, 400)
    models = [torch.randn(400, 400), torch.randn(400, 400)]
    dare = get_merge_method("dare_linear")
    info = TensorInfo("model.layers.0.mlp.up_proj.weight")
    one = dare(models, base, info=info, density=0.5, seed=7)
    assert torch.equal(one, dare(models, base, info=info, density=0.5, seed=7))
    assert not torch.equal(one, dare(models, base, info=info, density=0.5, seed=8))
    assert not torch.equal(one, dare(models, base, info=TensorInfo("other"), density=0.5, seed=7))
    assert abs(one.abs().sum() / (models[0] + models[1]).abs().sum() - 1) < 0.3
    torch.testing.assert_close(dare(models, base, density=1.0), models[0] + models[1])
