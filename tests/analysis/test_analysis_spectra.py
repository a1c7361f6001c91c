"""The pure spectral functions, on matrices whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.analysis import spectra


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
def test_gram_svd_matches_lapack(shape):
    torch.manual_seed(0)
    m = torch.randn(*shape)
    u, s, v = spectra.svd(m)
    torch.testing.assert_close(s.float(), torch.linalg.svdvals(m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((u * s) @ v.T, m.double(), atol=1e-5, rtol=0)
    k = min(shape)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ranks_of_known_matrices():
    eye = torch.eye(6)
    values = spectra.singular_values(eye)
    assert spectra.effective_rank(values) == pytest.approx(6.0)
    assert spectra.stable_rank(values) == pytest.approx(6.0)
    torch.manual_seed(0)
    low = torch.randn(20, 3) @ torch.randn(3, 30)
    values = spectra.singular_values(low)
    assert spectra.numerical_rank(values, (20, 30)) == 3
    rank_one = spectra.singular_values(torch.outer(torch.arange(1.0, 5.0), torch.ones(4)))
    assert spectra.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    zero = spectra.spectrum_summary(torch.zeros(4, 5))
    assert zero["numerical_rank"] == 0 and zero["effective_rank"] == 0.0 and zero["fro_norm"] == 0.0


def test_effective_rank_is_exp_entropy():
    values = torch.tensor([3.0, 1.0])
    p = torch.tensor([0.75, 0.25])
    assert spectra.effective_rank(values) == pytest.approx(math.exp(float(-(p * p.log()).sum())))


def test_intruder_dimension_found_only_for_a_new_direction():
    base = torch.diag(torch.arange(10.0, 2.0, -1.0))  # singular vectors: the coordinate axes
    spread = torch.ones(8) / math.sqrt(8)  # |cos| with every axis = 0.354 < 0.5
    tuned = base + 50 * torch.outer(spread, spread)
    found = spectra.intruder_dimensions(base, tuned, k=4, epsilon=0.5)
    assert found["count"] == 1 and found["indices"] == [0]
    assert found["relative_strength"] == [1.0] and 0.5 < found["energy_share"] < 1.0
    assert found["max_similarity"][0] == pytest.approx(1 / math.sqrt(8), abs=0.05)  # W₀ tilts it a little
    # the same update along a pre-trained direction (or a small dense one) adds no intruder
    assert spectra.intruder_dimensions(base, base + 50 * torch.outer(torch.eye(8)[0], torch.eye(8)[0]))["count"] == 0
    torch.manual_seed(0)
    assert spectra.intruder_dimensions(base, base + 0.01 * torch.randn(8, 8))["count"] == 0


def test_subspace_overlap_and_similarities():
    eye = torch.eye(6, dtype=torch.float64)
    assert spectra.subspace_overlap(eye[:, :2], eye[:, :2]) == pytest.approx(1.0)
    assert spectra.subspace_overlap(eye[:, :2], eye[:, 2:4]) == pytest.approx(0.0)
    assert spectra.subspace_overlap(eye[:, :2], eye[:, 1:3]) == pytest.approx(0.5)
    a = torch.randn(5, 4)
    assert spectra.cosine(a, a) == pytest.approx(1.0) and spectra.cosine(a, -a) == pytest.approx(-1.0)
    assert spectra.cosine(a, torch.zeros(5, 4)) == 0.0
    assert spectra.relative_difference(a, a) == 0.0 and spectra.relative_difference(a, -a) == pytest.approx(2.0)
    u, v = spectra.top_singular_vectors(torch.outer(torch.ones(5), torch.ones(4)), k=3)
    assert u.shape == (5, 1) and v.shape == (4, 1)  # capped at the numerical rank
