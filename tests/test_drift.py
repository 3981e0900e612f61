"""Drift / interference diagnostics on hand-made client deltas with known answers."""

import math

import pytest
import torch

from fedta_utils.drift import DeltaStats


def stats_of(deltas, weights):
    stats = DeltaStats(len(deltas[0]), "cpu", dtype=torch.float64)
    for delta, weight in zip(deltas, weights):
        stats.add(torch.tensor(delta, dtype=torch.float64), weight)
    return stats


def test_average_delta_weights_clients_by_sample_count():
    stats = stats_of([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], weights=[100, 300, 600])
    expected = torch.tensor([0.1 * 1 + 0.6 * 3, 0.3 * 1 + 0.6 * 3], dtype=torch.float64)
    assert torch.allclose(stats.average_delta(), expected, rtol=0, atol=1e-15)


def test_orthogonal_deltas_have_zero_mean_cosine():
    summary = stats_of([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0]], [1, 1, 1]).summary()
    assert summary["mean_pairwise_cosine"] == pytest.approx(0.0, abs=1e-12)


def test_mean_pairwise_cosine_matches_the_pairwise_definition():
    deltas = [[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [3.0, 0.0, 1.0], [-1.0, -1.0, -1.0]]
    tensors = [torch.tensor(d, dtype=torch.float64) for d in deltas]
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
             for i, a in enumerate(tensors) for j, b in enumerate(tensors) if i != j]
    summary = stats_of(deltas, [1, 2, 3, 4]).summary()
    assert summary["mean_pairwise_cosine"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_identical_directions_have_cosine_one():
    summary = stats_of([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]], [1, 1, 1]).summary()
    assert summary["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_sign_conflict_fraction_counts_entries_moved_both_ways():
    # entry 0: up/up (agree); 1: up/down (conflict); 2: untouched (not counted); 3: down/0 (agree)
    summary = stats_of([[1.0, 1.0, 0.0, -1.0], [2.0, -3.0, 0.0, 0.0]], [1, 1]).summary()
    assert summary["sign_conflict_fraction"] == pytest.approx(1 / 3)


def test_norms_of_client_and_average_deltas():
    summary = stats_of([[3.0, 4.0], [0.0, 0.0 + 2.0]], [1, 3]).summary()
    assert summary["mean_client_delta_norm"] == pytest.approx((5.0 + 2.0) / 2)
    assert summary["avg_delta_norm"] == pytest.approx(math.hypot(0.75, 1.0 + 1.5))


def test_single_client_has_no_pairwise_cosine():
    assert math.isnan(stats_of([[1.0, 2.0]], [5]).summary()["mean_pairwise_cosine"])


def test_sign_agreement_is_one_when_movers_agree_and_graded_otherwise():
    # entry 0: three up (1.0); entry 1: two up one down (1/3); entry 2: one up, others 0 (1.0); entry 3: untouched
    deltas = [[1.0, 1.0, 0.5, 0.0], [2.0, 1.0, 0.0, 0.0], [0.1, -4.0, 0.0, 0.0]]
    summary = stats_of(deltas, [1, 1, 1]).summary()
    assert summary["sign_agreement"] == pytest.approx((1.0 + 1 / 3 + 1.0) / 3)


def test_sign_agreement_of_random_signs_is_about_one_over_sqrt_m():
    generator = torch.Generator().manual_seed(0)
    deltas = (torch.rand(10, 20000, generator=generator) - 0.5).double()
    stats = DeltaStats(20000, "cpu", dtype=torch.float64)
    for delta in deltas:
        stats.add(delta, 1.0)
    # E|sum of 10 random signs| / 10 = 252/1024 * 10 / 10 ~ 0.246
    assert stats.summary()["sign_agreement"] == pytest.approx(0.246, abs=0.01)
