"""Client shards: partitions, exact class counts, balance, determinism, clear errors."""

import numpy as np
import pytest

from fedta_utils.checks import ConfigError
from fedta_utils.sharding import (
    dirichlet_shards,
    iid_shards,
    label_histogram,
    make_shards,
    non_iid_shards,
    shard_stats,
)


def assert_partition(shards, num_samples):
    joined = np.concatenate(shards)
    assert len(joined) == num_samples, "some sample is duplicated or missing"
    assert np.array_equal(np.sort(joined), np.arange(num_samples)), "shards are not a partition"


def test_iid_shards_are_a_partition_with_sizes_within_one(cifar_like_labels):
    shards = iid_shards(cifar_like_labels, 100, seed=0)
    assert len(shards) == 100
    assert_partition(shards, len(cifar_like_labels))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_iid_shards_follow_the_global_label_distribution(cifar_like_labels):
    histogram = label_histogram(iid_shards(cifar_like_labels, 100, seed=0), cifar_like_labels, 100)
    # 450 samples per class over 100 clients: every client holds 4 or 5 of every class
    assert histogram.min() >= 4 and histogram.max() <= 5


def test_iid_shards_with_uneven_sizes_still_differ_by_at_most_one():
    labels = np.repeat(np.arange(7), [13, 5, 9, 22, 1, 3, 10])
    shards = iid_shards(labels, 6, seed=3)
    assert_partition(shards, len(labels))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("classes_per_client", [1, 5, 10, 50])
def test_non_iid_shards_give_every_client_exactly_nc_classes(cifar_like_labels, classes_per_client):
    shards = non_iid_shards(cifar_like_labels, 100, classes_per_client, seed=0)
    stats = shard_stats(shards, cifar_like_labels, 100)
    assert (stats["classes"] == classes_per_client).all()


@pytest.mark.parametrize("classes_per_client", [1, 5, 10, 50])
def test_non_iid_shards_are_a_partition_of_equal_sizes(cifar_like_labels, classes_per_client):
    shards = non_iid_shards(cifar_like_labels, 100, classes_per_client, seed=0)
    assert_partition(shards, len(cifar_like_labels))
    assert {len(s) for s in shards} == {450}  # 45,000 / 100, exact for CIFAR-100


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes_per_client", [5, 10, 50])
def test_non_iid_class_sets_are_random_subsets_not_clusters(cifar_like_labels, classes_per_client, seed):
    # A fixed stride deals identical class sets to whole groups of clients (at Nc=5 only 20
    # distinct sets among 100, at Nc=50 two disjoint halves); random sets of Nc of 100 classes
    # are all distinct and no two share more than 80 % of their classes.
    shards = non_iid_shards(cifar_like_labels, 100, classes_per_client, seed=seed)
    sets = [frozenset(np.unique(cifar_like_labels[s])) for s in shards]
    assert len(set(sets)) == 100
    largest_overlap = max(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert largest_overlap <= 0.8 * classes_per_client


def test_non_iid_shards_use_every_class():
    labels = np.repeat(np.arange(10), 30)
    shards = non_iid_shards(labels, 4, 3, seed=1)  # 12 slices for 10 classes: some classes give two
    assert_partition(shards, len(labels))
    assert set(np.unique(labels[np.concatenate(shards)])) == set(range(10))
    assert all(len(np.unique(labels[s])) == 3 for s in shards)


def test_non_iid_shards_with_uneven_classes_keep_exact_class_counts():
    labels = np.repeat(np.arange(20), np.arange(20, 40))
    shards = non_iid_shards(labels, 30, 4, seed=2)
    assert_partition(shards, len(labels))
    assert all(len(np.unique(labels[s])) == 4 for s in shards)


@pytest.mark.parametrize(
    "function, kwargs",
    [
        (iid_shards, {}),
        (non_iid_shards, {"classes_per_client": 5}),
        (dirichlet_shards, {"alpha": 0.5}),
    ],
)
def test_shards_are_deterministic_under_a_seed_and_change_with_it(cifar_like_labels, function, kwargs):
    first = function(cifar_like_labels, 100, seed=7, **kwargs)
    again = function(cifar_like_labels, 100, seed=7, **kwargs)
    other = function(cifar_like_labels, 100, seed=8, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_shards_are_a_partition_of_equal_sizes(cifar_like_labels):
    shards = dirichlet_shards(cifar_like_labels, 100, alpha=0.1, seed=0)
    assert_partition(shards, len(cifar_like_labels))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_heterogeneity(cifar_like_labels):
    skewed = shard_stats(dirichlet_shards(cifar_like_labels, 100, 0.05, seed=0), cifar_like_labels, 100)
    mild = shard_stats(dirichlet_shards(cifar_like_labels, 100, 100.0, seed=0), cifar_like_labels, 100)
    assert skewed["largest_class_share"].mean() > 3 * mild["largest_class_share"].mean()


def test_non_iid_rejects_more_classes_than_exist(cifar_like_labels):
    with pytest.raises(ConfigError, match="classes_per_client=101"):
        non_iid_shards(cifar_like_labels, 100, 101, seed=0)


def test_non_iid_rejects_leaving_classes_out():
    labels = np.repeat(np.arange(100), 10)
    with pytest.raises(ConfigError, match="left out"):
        non_iid_shards(labels, 10, 5, seed=0)  # 50 slices for 100 classes


def test_non_iid_rejects_slices_larger_than_a_class():
    labels = np.repeat(np.arange(100), 45)
    with pytest.raises(ConfigError, match="45 samples but must be cut into 50 slices"):
        non_iid_shards(labels, 100, 50, seed=0)


@pytest.mark.parametrize("num_clients", [0, -3, 2.5, "10"])
def test_num_clients_must_be_a_positive_integer(cifar_like_labels, num_clients):
    with pytest.raises(ConfigError, match="num_clients"):
        iid_shards(cifar_like_labels, num_clients, seed=0)


def test_make_shards_names_the_missing_parameter(cifar_like_labels):
    with pytest.raises(ConfigError, match="classes_per_client"):
        make_shards(cifar_like_labels, "non_iid", 100, seed=0)
    with pytest.raises(ConfigError, match="sharding='pathological'"):
        make_shards(cifar_like_labels, "pathological", 100, seed=0)


def test_shard_stats_report_sizes_and_class_counts():
    labels = np.array([0, 0, 1, 2, 2, 2])
    stats = shard_stats([np.array([0, 1, 2]), np.array([3, 4, 5])], labels, 3)
    assert stats["samples"].tolist() == [3, 3]
    assert stats["classes"].tolist() == [2, 1]
    assert stats["largest_class_share"].tolist() == pytest.approx([2 / 3, 1.0])
