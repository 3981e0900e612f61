"""Client shards: how the training split is dealt out to K clients.

Every function returns a list of `num_clients` int64 arrays of positions into
`labels`, and together they form a partition: disjoint, and every sample is
used exactly once (no duplicated data, no class left out).

- iid_shards: stratified round-robin, so sizes differ by at most one and every
  client's label histogram follows the whole set's.
- non_iid_shards: every client holds exactly Nc distinct classes, a random set:
  class slices dealt at random, repaired so that no client holds two slices of
  one class (McMahan et al., 2017).
- dirichlet_shards: client class proportions drawn from a Dirichlet with
  concentration alpha per class (the FL-bench / Flower convention), equal sizes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .checks import ConfigError, check_choice, check_float, check_int
from .data import numpy_rng

SHARDINGS = ("iid", "non_iid", "dirichlet")


def iid_shards(labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal-size shards whose label distribution matches the whole set: the IID split.

    McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", deal the shuffled data out in equal parts; this split is also stratified. Samples are
    shuffled within each class, classes are laid end to end into one order o, and o is dealt
    round-robin: the client in slot j takes o[j], o[j + K], o[j + 2K], ... (the slot of each
    client is random too). With N samples, N_c of class c, client k's shard D_k has

        |D_k| in {floor(N / K), ceil(N / K)},    |D_k of class c| in {floor(N_c / K), ceil(N_c / K)}.

    Args:
        labels: [N] integer class labels (any array-like).
        num_clients: K, the number of shards, 1 <= K <= N.
        seed: the run's seed (>= 0); the shuffles draw from its stream "iid-shards".

    Returns:
        K sorted int64 arrays of positions into `labels`: a partition of 0..N-1.

    Raises:
        ConfigError: K outside 1..N, or a negative seed.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed, "iid-shards")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = np.concatenate(by_class)
    client_of_slot = rng.permutation(num_clients)  # which client deals first is random too
    slot_of_client = np.argsort(client_of_slot)
    return [np.sort(order[slot::num_clients]) for slot in slot_of_client]


def non_iid_shards(labels, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Shards in which every client holds exactly `classes_per_client` classes, chosen at random.

    The pathological non-IID split of McMahan et al. (2017), "Communication-Efficient Learning of
    Deep Networks from Decentralized Data" (there: sorted by label, 200 shards, 2 per client),
    with Nc classes per client. With C classes and S = K * Nc slices, class c is cut into

        s_c in {floor(S / C), ceil(S / C)} slices,  sum_c s_c = S,

    as equal in size as its samples allow (the extra slices go to random classes). The slices are
    dealt to the clients at random, Nc each, and a client dealt two slices of one class swaps one
    of them with a client that lacks that class (`deal_classes`). Client class sets are therefore
    random subsets of size Nc, not clusters of identical sets, and every sample lies in exactly one
    slice: client k's shard is the union of its Nc slices.

    Args:
        labels: [N] integer class labels (any array-like).
        num_clients: K, the number of shards, 1 <= K <= N.
        classes_per_client: Nc, 1 <= Nc <= C, with K * Nc >= C so that no class is left out.
        seed: the run's seed (>= 0); every draw comes from its stream "non-iid-shards".

    Returns:
        K sorted int64 arrays of positions into `labels`: a partition of 0..N-1.

    Raises:
        ConfigError: for an impossible request: Nc > C, K * Nc < C (a class would be left out),
            or a class with fewer samples than the slices it must fill.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed, "non-iid-shards")
    classes, class_sizes = np.unique(labels, return_counts=True)
    classes_per_client = check_int("classes_per_client", classes_per_client, minimum=1, maximum=len(classes))
    num_slices = num_clients * classes_per_client
    if num_slices < len(classes):
        raise ConfigError(
            f"classes_per_client={classes_per_client} with num_clients={num_clients} gives "
            f"{num_slices} class slices for {len(classes)} classes: some classes would be left out; "
            f"need num_clients * classes_per_client >= {len(classes)}"
        )
    slices_per_class = _spread_evenly(num_slices, len(classes), rng)
    for label, count, available in zip(classes, slices_per_class, class_sizes):
        if count > available:
            raise ConfigError(
                f"class {label} has {available} samples but must be cut into {count} slices "
                f"(num_clients={num_clients}, classes_per_client={classes_per_client}); lower one of them"
            )
    holds = deal_classes(slices_per_class, num_clients, classes_per_client, rng)  # [K, Nc] class indices
    parts = [[] for _ in range(num_clients)]
    for c, (label, count) in enumerate(zip(classes, slices_per_class)):
        members = rng.permutation(np.flatnonzero(labels == label))
        pieces = np.array_split(members, count)
        owners = np.flatnonzero((holds == c).any(axis=1))  # each holds exactly one slice of class c
        piece_order = rng.permutation(count)  # which owner gets which piece
        for owner, i in zip(owners, piece_order):
            parts[owner].append(pieces[i])
    return [np.sort(np.concatenate(p)) for p in parts]


def deal_classes(
    slices_per_class: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """[K, Nc] class of each client's slots: slices dealt at random, then duplicates swapped away.

    A client holding class x twice swaps one x slot with a random slot (of some client b that
    lacks x) whose class it lacks: its duplicates drop by one and b gains none, so this ends.
    """
    slice_classes = np.repeat(np.arange(len(slices_per_class)), slices_per_class)  # one entry per slice
    holds = rng.permutation(slice_classes).reshape(num_clients, per_client)
    for client in range(num_clients):
        while True:
            values, first = np.unique(holds[client], return_index=True)
            duplicates = np.setdiff1d(np.arange(per_client), first)
            if len(duplicates) == 0:
                break
            slot = duplicates[0]
            x = holds[client, slot]
            lacks_x = ~(holds == x).any(axis=1, keepdims=True)  # [K, 1]: the clients without class x
            swappable = ~np.isin(holds, values) & lacks_x
            if not swappable.any():
                raise ConfigError(f"cannot deal {per_client} distinct classes to {num_clients} clients")
            candidates = np.argwhere(swappable)  # [M, 2]: (client, slot) pairs
            other, other_slot = candidates[rng.integers(swappable.sum())]
            holds[client, slot], holds[other, other_slot] = holds[other, other_slot], x
    return holds


def dirichlet_shards(labels, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Equal-size shards with Dirichlet class proportions (Hsu et al., 2019).

    Hsu, Qi and Brown (2019), "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", draw each client's class proportions from a Dirichlet
    around the class frequencies p (p_c = N_c / N). Here client k, in turn, draws

        q_k ~ Dir(alpha * C * p),    |D_k| in {floor(N / K), ceil(N / K)},

    and takes its |D_k| samples without replacement from the classes that still have samples,
    proportionally to q_k (renormalised when a class runs out). For balanced classes that is a
    concentration of alpha per class, the FL-bench / Flower convention; Hsu et al. write
    Dir(alpha' * p), so their alpha' is C times this alpha. Small alpha: few classes per client;
    large alpha: close to iid.

    Args:
        labels: [N] integer class labels (any array-like).
        num_clients: K, the number of shards, 1 <= K <= N.
        alpha: the concentration per class of balanced data, > 0.
        seed: the run's seed (>= 0); every draw comes from its stream "dirichlet-shards".

    Returns:
        K sorted int64 arrays of positions into `labels`: a partition of 0..N-1.

    Raises:
        ConfigError: K outside 1..N, alpha <= 0, or a negative seed.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed, "dirichlet-shards")
    alpha = check_float("dirichlet_alpha", alpha, 0.0, None, low_open=True)
    classes, class_sizes = np.unique(labels, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]  # shuffled, per class
    prior = class_sizes / len(labels)
    concentration = alpha * prior * len(classes)
    sizes = _spread_evenly(len(labels), num_clients, rng)
    shards = []
    for size in sizes:
        proportions = rng.dirichlet(concentration)
        taken = _draw_from_pools(pools, proportions, size, rng)  # empties the pools it draws from
        shards.append(np.sort(taken))
    return shards


def make_shards(
    labels,
    sharding: str,
    num_clients: int,
    seed: int,
    *,
    classes_per_client: int | None = None,
    dirichlet_alpha: float | None = None,
) -> list:
    """Dispatch on `sharding` ('iid', 'non_iid', 'dirichlet'), with the argument that sharding needs.

    Args:
        labels: [N] integer class labels (any array-like).
        sharding: one of SHARDINGS.
        num_clients: K, the number of shards.
        seed: the run's seed (>= 0).
        classes_per_client: Nc, required by 'non_iid' (see non_iid_shards).
        dirichlet_alpha: alpha, required by 'dirichlet' (see dirichlet_shards).

    Returns:
        K sorted int64 arrays of positions into `labels`: a partition of 0..N-1.
    """
    check_choice("sharding", sharding, SHARDINGS)
    if sharding == "iid":
        return iid_shards(labels, num_clients, seed)
    if sharding == "non_iid":
        if classes_per_client is None:
            raise ConfigError("sharding='non_iid' needs classes_per_client (an integer >= 1)")
        return non_iid_shards(labels, num_clients, classes_per_client, seed)
    if dirichlet_alpha is None:
        raise ConfigError("sharding='dirichlet' needs dirichlet_alpha (a number > 0)")
    return dirichlet_shards(labels, num_clients, dirichlet_alpha, seed)


def label_histogram(shards: list[np.ndarray], labels, num_classes: int) -> np.ndarray:
    """[K, num_classes] counts of each class on each client."""
    labels = np.asarray(labels)
    counts = [np.bincount(labels[s], minlength=num_classes) for s in shards]
    return np.stack(counts)


def shard_stats(shards: list[np.ndarray], labels, num_classes: int) -> pd.DataFrame:
    """One row per client: samples, distinct classes, share of its largest class."""
    histogram = label_histogram(shards, labels, num_classes)
    sizes = histogram.sum(axis=1)
    return pd.DataFrame(
        {
            "client": np.arange(len(shards)),
            "samples": sizes,
            "classes": (histogram > 0).sum(axis=1),
            "largest_class_share": histogram.max(axis=1) / np.maximum(sizes, 1),
        }
    )


def _labels_and_rng(
    labels, num_clients: int, seed: int, stream: str
) -> tuple[np.ndarray, np.random.Generator]:
    """`labels` as an array and the random stream (seed, stream), once num_clients and seed are checked."""
    labels = np.asarray(labels)
    check_int("num_clients", num_clients, minimum=1, maximum=len(labels))
    seed = check_int("seed", seed, minimum=0)
    return labels, numpy_rng(seed, stream)


def _spread_evenly(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` integers that sum to `total` and differ by at most one (extras at random)."""
    counts = np.full(parts, total // parts, dtype=np.int64)
    extra = rng.choice(parts, size=total % parts, replace=False)
    counts[extra] += 1
    return counts


def _draw_from_pools(
    pools: list[list[int]],
    proportions: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """`size` samples taken off the front of the class `pools` (removed from them), the number from each
    class drawn multinomially with `proportions`, redrawn over the classes left until `size` are taken."""
    taken: list[int] = []
    while len(taken) < size:
        available = np.array([len(p) > 0 for p in pools])
        weights = np.where(available, proportions, 0.0)
        if weights.sum() <= 0:  # q put all its mass on exhausted classes
            weights = available.astype(float)
        missing = size - len(taken)
        want = rng.multinomial(missing, weights / weights.sum())
        for c in np.flatnonzero(want):
            count = min(want[c], len(pools[c]))
            taken.extend(pools[c][:count])
            del pools[c][:count]
    return np.asarray(taken, dtype=np.int64)
