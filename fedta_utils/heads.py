"""Step 0 of sparse fine-tuning: a closed-form ridge head on frozen features, then kept frozen.

Federated exactly (Fed3R, Fani et al., ICML 2024): each client k extracts frozen-backbone
features Phi_k (with a bias column) and sends A_k = Phi_k^T Phi_k and b_k = Phi_k^T Y_k
(Y one-hot). The server solves (A + lambda' I) W = b with A = sum_k A_k, b = sum_k b_k. Sums
of per-client statistics are the statistics of the union, so the head equals the centralized
ridge solution for any sharding and any client order (float64 throughout).

A ridge head regresses one-hot targets, so its logits live in [0, 1] and a softmax over them is
nearly flat. The logit scale s is chosen the same federated way: each client sends its summed
cross-entropy for every s on a grid, the server keeps the s with the lowest total. The scale
matters for the sampled-label Fisher, whose labels come from this softmax.

The penalty is either fixed or chosen on the server's validation split from RIDGE_LAMBDAS
(choose_ridge_lambda): A and b are summed once, and solving for each penalty is cheap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, make_batch, sequential_batches
from .models import autocast

LOGIT_SCALES = tuple(float(s) for s in np.logspace(0, 3, 13))  # 1 ... 1000
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative penalties a validation choice picks from
LAMBDA_TOLERANCE = 0.01  # validation accuracy given up for a larger, steadier penalty


@torch.inference_mode()
def client_features(model: nn.Module, image_set: ImageSet, indices, img_size: int, precision: str,
                    batch_size: int = 256) -> torch.Tensor:
    """Frozen-backbone features [n, D] (float32) of positions `indices`, no augmentation."""
    model.eval()
    index = torch.as_tensor(np.asarray(indices), device=image_set.labels.device)
    parts = []
    for chunk in sequential_batches(len(index), batch_size, index.device):
        inputs, _ = make_batch(image_set, index[chunk], img_size)
        with autocast(inputs.device, precision):
            parts.append(model.forward_head(model.forward_features(inputs), pre_logits=True).float())
    return torch.cat(parts)


def ridge_statistics(feats: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Phi^T Phi and b = Phi^T Y for one client (float64, Phi with a bias column)."""
    phi = torch.cat([feats.double(), feats.new_ones(len(feats), 1, dtype=torch.float64)], dim=1)
    return phi.T @ phi, phi.T @ F.one_hot(labels, num_classes).double()


def solve_ridge(a_sum: torch.Tensor, b_sum: torch.Tensor,
                ridge_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A + lambda * mean(diag A) * I) W = b; returns the head's weight [C, D] and bias [C].

    The penalty is relative to the mean eigenvalue of A (trace / dimension), so one value suits
    any feature scale and sample count. A nearly unregularised head puts large weights on
    low-variance feature directions; scaled to a useful logit range, it turns small feature
    changes into large logit changes, which makes fine-tuning under the frozen head diverge.
    """
    eye = torch.eye(a_sum.shape[0], dtype=a_sum.dtype, device=a_sum.device)
    solution = torch.linalg.solve(a_sum + ridge_lambda * torch.diagonal(a_sum).mean() * eye, b_sum)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def choose_ridge_lambda(lambdas, val_accuracies, tolerance: float = LAMBDA_TOLERANCE) -> float:
    """The largest penalty whose validation accuracy is within `tolerance` of the best one.

    Ties and near-ties go to the larger penalty, whose head has smaller weights on low-variance
    directions and so is less prone to make fine-tuning diverge (solve_ridge). That is a
    preference, not a guarantee: validation accuracy of the head alone cannot see how stable
    fine-tuning under it will be, and a clearly more accurate small penalty is still chosen.
    """
    best = max(val_accuracies)
    return max(lam for lam, acc in zip(lambdas, val_accuracies) if acc >= best - tolerance)


def federated_ridge_head(client_feats: list[torch.Tensor], client_labels: list[torch.Tensor],
                         num_classes: int, ridge_lambda: float | None,
                         scales: tuple[float, ...] = LOGIT_SCALES, val_feats: torch.Tensor | None = None,
                         val_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weight, bias, info) of the ridge head from per-client statistics, scale chosen federatedly.

    ridge_lambda=None chooses it from RIDGE_LAMBDAS by accuracy on (val_feats, val_labels), which
    the server holds; info then has the accuracy per penalty. Nothing but A_k, b_k and a vector
    of loss sums leaves client k.
    """
    stats = [ridge_statistics(f, y, num_classes) for f, y in zip(client_feats, client_labels)]
    a_sum, b_sum = sum(a for a, _ in stats), sum(b for _, b in stats)
    chosen = {}
    if ridge_lambda is None:
        heads = [solve_ridge(a_sum, b_sum, lam) for lam in RIDGE_LAMBDAS]
        accuracies = [float(((val_feats.double() @ w.T + c).argmax(1) == val_labels).double().mean())
                      for w, c in heads]
        ridge_lambda = choose_ridge_lambda(RIDGE_LAMBDAS, accuracies)
        chosen = {"val_accuracy_per_lambda": {f"{lam:g}": acc for lam, acc in zip(RIDGE_LAMBDAS, accuracies)}}
    weight, bias = solve_ridge(a_sum, b_sum, ridge_lambda)
    losses = sum(torch.stack([F.cross_entropy(s * (f.double() @ weight.T + bias), y, reduction="sum")
                              for s in scales]) for f, y in zip(client_feats, client_labels))
    best = int(torch.argmin(losses))
    info = {"ridge_lambda": ridge_lambda, "logit_scale": scales[best],
            "train_loss_at_scale": float(losses[best]) / sum(len(y) for y in client_labels), **chosen}
    return (scales[best] * weight).float(), (scales[best] * bias).float(), info
