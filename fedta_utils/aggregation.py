"""The server's merge rules: how one round's client deltas become the step the server takes.

Each rule is a streaming accumulator: the round calls `merge.add(delta, n_k)` as each client
finishes (d_k = w_k - w_t, flat, over the trainable entries; n_k its shard size) and
`merge.result()` once all have, so no client delta is kept. The result goes to
`fedavg.server_update` as the average delta, whose server_lr plays the role of TIES's lambda.

    mean     sum_k n_k d_k / sum_k n_k                          (FedAvg, McMahan et al., 2017)
    ties     trim, elect sign, disjoint mean                    (Yadav et al., NeurIPS 2023)
    fisher   sum_k n_k F_k d_k / (sum_k n_k F_k + eps)          (Matena and Raffel, NeurIPS 2022)

Buffers are float32 on the deltas' device, allocated up front from `size` and `device`; nothing
is read back to the host.
"""

from __future__ import annotations

import math

import torch

from .checks import check_choice, check_float

MERGE_RULES = ("mean", "ties", "fisher")


class MeanMerge:
    """FedAvg's weighted mean (McMahan et al., AISTATS 2017):

    result = sum_k n_k d_k / sum_k n_k
    """

    def __init__(self, size: int, device):
        self.weighted_sum = torch.zeros(size, device=device)
        self.total_weight = 0.0

    def add(self, delta: torch.Tensor, n_k: float):
        self.weighted_sum.add_(delta, alpha=n_k)
        self.total_weight += n_k

    def result(self):
        return self.weighted_sum / self.total_weight


class TiesMerge:
    """TIES-Merging (Yadav et al., NeurIPS 2023), streamed over clients and weighted by n_k.

        trim     t_k = d_k on its top ceil(density * size) entries by |d_k| (at least 1), else 0
        elect    s = sign(sum_k n_k t_k)
        merge    result_j = sum_{k: sign(t_kj) = s_j} n_k t_kj / sum_{k: sign(t_kj) = s_j} n_k
                 (0 where s_j = 0 or no client agrees)

    With equal shard sizes the n_k cancel and this is TIES's plain sign election and disjoint
    mean. Streaming needs four running sums per entry: the n_k-weighted sums of the positive and
    of the negative trimmed entries, and the total n_k behind each; the two sums add up to
    sum_k n_k t_k, whose sign is the elected one. density: TIES's k as a fraction, in (0, 1].
    """

    def __init__(self, size: int, device, density: float = 0.2):
        # TIES's default k = 20: keep the top 20% of each task vector (Yadav et al., 2023).
        density = check_float(
            "ties_density",
            density,
            0.0,
            1.0,
            low_open=True,
        )
        # The 1e-6 keeps float error (0.07 * 100 = 7.000000000000001) from keeping an extra entry.
        keep = math.ceil(density * size - 1e-6)
        self.keep = max(1, keep)
        zeros = torch.zeros(size, device=device)
        self.up_sum = zeros.clone()
        self.down_sum = zeros.clone()
        self.up_weight = zeros.clone()
        self.down_weight = zeros

    def add(self, delta: torch.Tensor, n_k: float):
        magnitude = delta.abs()
        top = magnitude.topk(self.keep).indices
        trimmed = torch.zeros_like(self.up_sum)
        trimmed[top] = delta[top]
        up = trimmed.clamp(min=0)
        down = trimmed.clamp(max=0)
        self.up_sum.add_(up, alpha=n_k)
        self.down_sum.add_(down, alpha=n_k)
        self.up_weight.add_(up > 0, alpha=n_k)
        self.down_weight.add_(down < 0, alpha=n_k)

    def result(self):
        # sum_k n_k t_k: its sign is the elected one.
        vote = self.up_sum + self.down_sum
        agreeing_sum = torch.where(vote > 0, self.up_sum, self.down_sum)
        agreeing_weight = torch.where(vote > 0, self.up_weight, self.down_weight)
        # A nonzero vote has a client behind it, so agreeing_weight > 0 wherever it is used.
        return torch.where(vote != 0, agreeing_sum / agreeing_weight, 0.0)


class FisherMerge:
    """Fisher-weighted averaging (Matena and Raffel, NeurIPS 2022), weighted by n_k / n:

        result = sum_k (n_k / n) F_k d_k / (sum_k (n_k / n) F_k + eps),   n = sum_k n_k

    so eps is measured against a mean Fisher, whatever the shard sizes.

    F_k: client k's diagonal Fisher, flat like d_k and >= 0 (`fisher`). An entry that a client's
    Fisher does not weigh is not moved by that client; equal Fishers give FedAvg's mean.
    """

    def __init__(self, size: int, device, eps: float = 1e-8):
        # eps > 0: an entry no client's Fisher weighs gets a step of ~0, not 0 / 0. It is small
        # beside sum_k n_k F_k wherever some client's Fisher is not negligible.
        self.eps = check_float("fisher_eps", eps, 0.0, low_open=True)
        zeros = torch.zeros(size, device=device)
        self.weighted_sum = zeros.clone()
        self.fisher_sum = zeros
        self.total_weight = 0.0

    def add(self, delta: torch.Tensor, n_k: float, fisher: torch.Tensor):
        self.weighted_sum.addcmul_(fisher, delta, value=n_k)
        self.fisher_sum.add_(fisher, alpha=n_k)
        self.total_weight += n_k

    def result(self):
        # Dividing both sums by n gives the n_k / n form above.
        return self.weighted_sum / (self.fisher_sum + self.eps * self.total_weight)


def make_merge(rule: str, size: int, device, **options):
    """The accumulator for `rule` (one of MERGE_RULES) over deltas of `size` entries on `device`;
    options go to its constructor (TiesMerge's density, FisherMerge's eps)."""
    check_choice("merge_rule", rule, MERGE_RULES)
    merges = {"mean": MeanMerge, "ties": TiesMerge, "fisher": FisherMerge}
    return merges[rule](size, device, **options)
