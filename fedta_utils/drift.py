"""Client drift and interference diagnostics, accumulated as clients finish.

For the m client deltas d_k of one round (flat vectors) this reports:

    mean_client_delta_norm   mean_k ||d_k||
    avg_delta_norm           || sum_k (n_k / n) d_k ||      (the server's step before eta_s)
    mean_pairwise_cosine     mean over k != l of cos(d_k, d_l)
    sign_conflict_fraction   among entries some client moved, the share that
                             one client moved up and another moved down
    sign_agreement           among entries some client moved, the mean of
                             |sum_k sign(d_k)| / (clients that moved it): 1 when
                             all movers agree, about 1/sqrt(m) for random signs.
                             With 10 dense clients nearly every entry has some
                             conflict, so this graded version is the one that
                             separates settings.

None of them needs the deltas kept: with u_k = d_k / ||d_k||,
sum_{k != l} <u_k, u_l> = ||sum_k u_k||^2 - m, so one running sum of unit
vectors gives the mean pairwise cosine exactly; two boolean vectors
("some client moved it up", "... down") give the sign conflicts. Memory is
constant in m, as sequential simulation requires; a running sum of signs and
a count of movers give the sign agreement.
"""

from __future__ import annotations

import math

import torch


class DeltaStats:
    """Streaming accumulator over one round's client deltas."""

    def __init__(self, size: int, device: torch.device | str, dtype=torch.float32):
        self.weighted_sum = torch.zeros(size, device=device, dtype=dtype)
        self.unit_sum = torch.zeros(size, device=device, dtype=dtype)
        self.moved_up = torch.zeros(size, device=device, dtype=torch.bool)
        self.moved_down = torch.zeros(size, device=device, dtype=torch.bool)
        self.sign_sum = torch.zeros(size, device=device, dtype=dtype)
        self.movers = torch.zeros(size, device=device, dtype=dtype)
        self.norms: list[torch.Tensor] = []
        self.total_weight = 0.0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Record one client's delta (flat) with its aggregation weight (its sample count)."""
        norm = torch.linalg.vector_norm(delta)
        self.weighted_sum.add_(delta, alpha=float(weight))
        self.unit_sum.add_(delta / norm.clamp_min(torch.finfo(delta.dtype).tiny))
        self.moved_up |= delta > 0
        self.moved_down |= delta < 0
        signs = torch.sign(delta)
        self.sign_sum.add_(signs)
        self.movers.add_(signs.abs())
        self.norms.append(norm)
        self.total_weight += float(weight)

    @property
    def count(self) -> int:
        return len(self.norms)

    def average_delta(self) -> torch.Tensor:
        """sum_k (n_k / n) d_k: FedAvg's aggregate (McMahan et al., 2017, weights n_k / n)."""
        return self.weighted_sum / self.total_weight

    def summary(self) -> dict[str, float]:
        """The five diagnostics as floats (one host sync per round)."""
        m = self.count
        norms = torch.stack(self.norms)
        moved = (self.moved_up | self.moved_down).sum()
        conflicts = (self.moved_up & self.moved_down).sum()
        agreement = (self.sign_sum.abs() / self.movers.clamp_min(1)).sum()
        values = torch.stack([norms.mean(), torch.linalg.vector_norm(self.average_delta()),
                              self.unit_sum.square().sum(), moved.float(), conflicts.float(),
                              agreement.float()]).tolist()
        mean_norm, avg_norm, unit_sq, moved, conflicts, agreement = values
        cosine = (unit_sq - m) / (m * (m - 1)) if m > 1 else math.nan
        return {
            "mean_client_delta_norm": mean_norm,
            "avg_delta_norm": avg_norm,
            "mean_pairwise_cosine": cosine,
            "sign_conflict_fraction": conflicts / moved if moved > 0 else 0.0,
            "sign_agreement": agreement / moved if moved > 0 else 1.0,
        }
