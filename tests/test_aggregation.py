"""Merge rules: FedAvg's mean, TIES-Merging and Fisher-weighted averaging, each streamed over clients
and checked against a direct form that holds every delta at once."""

import math

import pytest
import torch

from fedta_utils.aggregation import FisherMerge, MeanMerge, TiesMerge, make_merge
from fedta_utils.checks import ConfigError

# 3 clients x 6 entries, density 1/2 (3 entries kept each), picked so every step of TIES matters:
# entry 0: two clients agree, one is trimmed away -> their mean, not the mean over all three;
# entry 1: untrimmed, the sum's sign is negative; trimming flips the election to positive;
# entry 2: a client with the losing sign is left out of the mean;
# entry 3: every client is trimmed away -> 0;  entry 4: the signs tie -> no elected sign -> 0;
# entry 5: a large positive and a large negative entry; the larger one wins alone.
HAND_DELTAS = torch.tensor(
    [
        [3.0, -1.0, 2.0, 0.0, -4.0, 0.5],  # trimmed: [3, 0, 2, 0, -4, 0]
        [1.0, 2.0, -3.0, 0.2, 0.0, -5.0],  # trimmed: [0, 2, -3, 0, 0, -5]
        [5.0, -2.0, 1.0, -0.5, 4.0, 6.0],  # trimmed: [5, 0, 0, 0, 4, 6]
    ]
)


def stream(merge, deltas, weights, fishers=None):
    """Feed the clients one at a time, as the round does, and return the merged delta."""
    for k, delta in enumerate(deltas):
        if fishers is None:
            merge.add(delta, weights[k])
        else:
            merge.add(delta, weights[k], fisher=fishers[k])
    return merge.result()


def ties_two_pass(deltas, weights, density):
    """TIES written directly on the stacked deltas (Yadav et al., 2023, Algorithm 1), n_k-weighted."""
    keep = round(density * deltas.shape[1])  # the tests pick sizes where density * size is whole
    kth_largest = deltas.abs().sort(dim=1, descending=True).values[:, keep - 1 : keep]
    trimmed = deltas * (deltas.abs() >= kth_largest)
    n = torch.as_tensor(weights, dtype=torch.float32)[:, None]
    elected = torch.sign((n * trimmed).sum(0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    agreeing_weight = (n * agrees).sum(0)
    mean = (n * trimmed * agrees).sum(0) / agreeing_weight
    return torch.where(agreeing_weight > 0, mean, 0.0)


def weighted_mean(deltas, weights):
    n = torch.as_tensor(weights, dtype=torch.float32)[:, None]
    return (n * deltas).sum(0) / n.sum()


def random_deltas(clients=5, size=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(clients, size, generator=generator)


UNEQUAL_WEIGHTS = [120, 35, 400, 7, 64]


def test_mean_merge_is_the_weighted_mean():
    deltas = random_deltas()
    merged = stream(MeanMerge(1000, "cpu"), deltas, UNEQUAL_WEIGHTS)
    torch.testing.assert_close(merged, weighted_mean(deltas, UNEQUAL_WEIGHTS))


def test_ties_on_hand_made_deltas_matches_hand_numbers_and_the_direct_form():
    merged = stream(make_merge("ties", 6, "cpu", density=0.5), HAND_DELTAS, [1, 1, 1])
    expected = torch.tensor([4.0, 2.0, -3.0, 0.0, 0.0, 6.0])
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(ties_two_pass(HAND_DELTAS, [1, 1, 1], 0.5), expected)


def test_ties_weights_by_shard_size():
    # With n = (1, 2, 3): entry 0 becomes (1*3 + 3*5) / (1 + 3); entry 4's tie breaks for the
    # third client's +4 (weight 3 beats 1).
    merged = stream(TiesMerge(6, "cpu", density=0.5), HAND_DELTAS, [1, 2, 3])
    expected = torch.tensor([4.5, 2.0, -3.0, 0.0, 4.0, 6.0])
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(ties_two_pass(HAND_DELTAS, [1, 2, 3], 0.5), expected)


def test_ties_streaming_equals_two_pass_on_random_deltas():
    deltas = random_deltas()
    merged = stream(TiesMerge(1000, "cpu", density=0.3), deltas, UNEQUAL_WEIGHTS)
    torch.testing.assert_close(merged, ties_two_pass(deltas, UNEQUAL_WEIGHTS, 0.3))


@pytest.mark.parametrize(
    ("density", "size", "kept"), [(0.07, 100, 7), (0.25, 10, 3), (0.01, 6, 1), (1.0, 6, 6)]
)
def test_ties_trim_keeps_ceil_density_times_size_entries_at_least_one(density, size, kept):
    # One client: its trimmed delta is the merge (every kept entry elects its own sign).
    delta = random_deltas(clients=1, size=size)[0]
    merged = stream(TiesMerge(size, "cpu", density=density), [delta], [10])
    largest = delta.abs().topk(kept).indices
    assert torch.count_nonzero(merged) == kept
    torch.testing.assert_close(merged[largest], delta[largest])


def test_ties_with_density_one_and_agreeing_signs_is_the_weighted_mean():
    generator = torch.Generator().manual_seed(1)
    shared_sign = torch.sign(torch.randn(1000, generator=generator))
    deltas = (torch.rand(5, 1000, generator=generator) + 0.1) * shared_sign
    merged = stream(TiesMerge(1000, "cpu", density=1.0), deltas, UNEQUAL_WEIGHTS)
    torch.testing.assert_close(merged, weighted_mean(deltas, UNEQUAL_WEIGHTS))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_ties_density_outside_0_1_is_refused_by_name_before_any_compute(density):
    # A device that does not exist: allocating a buffer first would raise a RuntimeError instead.
    with pytest.raises(ConfigError, match="ties_density"):
        TiesMerge(6, "no-such-device", density=density)
    with pytest.raises(ConfigError, match="ties_density"):
        make_merge("ties", 6, "no-such-device", density=density)


def test_fisher_merge_with_equal_fishers_is_the_weighted_mean():
    deltas = random_deltas()
    fisher = torch.rand(1000, generator=torch.Generator().manual_seed(2)) + 0.5
    merged = stream(FisherMerge(1000, "cpu"), deltas, UNEQUAL_WEIGHTS, [fisher] * 5)
    expected = weighted_mean(deltas, UNEQUAL_WEIGHTS)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)


def test_fisher_merge_client_with_zero_fisher_does_not_move_that_entry():
    deltas = random_deltas(clients=3, size=8)
    deltas[0, 4] = 1000.0  # would dominate entry 4 if its zero Fisher did not silence it
    fishers = torch.ones(3, 8)
    fishers[0, 4] = 0.0
    weights = [5, 2, 3]
    merged = stream(FisherMerge(8, "cpu"), deltas, weights, fishers)
    others = weighted_mean(deltas[1:, 4:5], weights[1:])
    torch.testing.assert_close(merged[4:5], others, rtol=1e-6, atol=1e-7)


def test_fisher_merge_is_zero_where_every_fisher_is_zero():
    deltas = random_deltas(clients=3, size=8)
    fishers = torch.ones(3, 8)
    fishers[:, 6] = 0.0
    merged = stream(FisherMerge(8, "cpu"), deltas, [5, 2, 3], fishers)
    assert merged[6] == 0.0
    assert torch.isfinite(merged).all()


def test_fisher_eps_must_be_positive():
    with pytest.raises(ConfigError, match="fisher_eps"):
        make_merge("fisher", 8, "cpu", eps=0.0)


def test_unknown_rule_is_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"merge_rule='median'.*\['mean', 'ties', 'fisher'\]"):
        make_merge("median", 8, "cpu")


def test_fisher_merge_does_not_depend_on_the_scale_of_the_shard_sizes():
    """eps is measured against the n_k / n-weighted Fisher: scaling every n_k leaves the step alone."""
    generator = torch.Generator().manual_seed(3)
    deltas = [torch.randn(5, generator=generator) for _ in range(3)]
    fishers = [torch.rand(5, generator=generator) * 1e-8 for _ in range(3)]  # about eps
    steps = []
    for scale in (1.0, 1000.0):
        merge = FisherMerge(5, "cpu")
        for delta, fisher, n_k in zip(deltas, fishers, (1.0, 2.0, 3.0)):
            merge.add(delta, n_k * scale, fisher=fisher)
        steps.append(merge.result())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=0.0)
