"""Step 0 of sparse fine-tuning: a classifier head that is then kept frozen.

Ridge head (closed form, federated exactly; Fed3R, Fani et al., ICML 2024).
Each client k extracts frozen-backbone features Phi_k (with a bias column)
and sends A_k = Phi_k^T Phi_k and b_k = Phi_k^T Y_k (Y one-hot). The server
solves (A + lambda' I) W = b with A = sum_k A_k, b = sum_k b_k and
lambda' = lambda * trace(A) / dim (see solve_ridge). Sums of per-client statistics
are the statistics of the union, so the head equals the centralized ridge
solution for any sharding and any client order (float64 throughout).

A ridge head regresses one-hot targets, so its logits live in [0, 1] and a
softmax over them is nearly flat. The logit scale s is chosen the same
federated way: each client sends its summed cross-entropy for every s on a
grid, the server keeps the s with the lowest total. The scale matters for
the sampled-label Fisher, whose labels come from this softmax.

Linear probe (the alternative): the head is trained by FedAvg on cached
frozen features (one client holding all data for the centralized case).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, make_batch, sequential_batches
from .models import features
from .precision import autocast
from .seeding import numpy_rng

LOGIT_SCALES = tuple(float(s) for s in np.logspace(0, 3, 13))  # 1 ... 1000


@dataclass
class HeadFit:
    """A fitted head: weight [C, D], bias [C], and how it was chosen."""

    weight: torch.Tensor
    bias: torch.Tensor
    info: dict

    def install(self, model: nn.Module) -> None:
        head = model.get_classifier()
        with torch.no_grad():
            head.weight.copy_(self.weight.to(head.weight))
            head.bias.copy_(self.bias.to(head.bias))


@torch.inference_mode()
def client_features(model: nn.Module, image_set: ImageSet, indices: np.ndarray, img_size: int,
                    precision: str, batch_size: int = 256) -> torch.Tensor:
    """Frozen-backbone features [n, D] (float32) of positions `indices`, no augmentation."""
    model.eval()
    index = torch.as_tensor(indices, device=image_set.labels.device)
    parts = []
    for chunk in sequential_batches(len(index), batch_size, index.device):
        inputs, _ = make_batch(image_set, index[chunk], img_size)
        with autocast(inputs.device, precision):
            parts.append(features(model, inputs).float())
    return torch.cat(parts) if parts else torch.zeros(0, model.num_features, device=index.device)


def ridge_statistics(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Phi^T Phi and b = Phi^T Y for one client (float64, Phi with a bias column)."""
    phi = _with_bias(feats.double())
    targets = F.one_hot(labels, num_classes).double()
    return phi.T @ phi, phi.T @ targets


def solve_ridge(a_sum: torch.Tensor, b_sum: torch.Tensor, ridge_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A + lambda * mean(diag A) * I) W = b; returns the head's weight [C, D] and bias [C].

    The penalty is relative to the mean eigenvalue of A (trace / dimension),
    so one value suits any feature scale and sample count. It must be strong:
    a nearly unregularised ridge head puts large weights on low-variance
    feature directions, and once scaled to a useful logit range it turns
    small feature changes into large logit changes, which makes fine-tuning
    the backbone under the frozen head diverge.
    """
    eye = torch.eye(a_sum.shape[0], dtype=a_sum.dtype, device=a_sum.device)
    penalty = ridge_lambda * torch.diagonal(a_sum).mean()
    solution = torch.linalg.solve(a_sum + penalty * eye, b_sum)  # [D + 1, C]
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def federated_ridge_head(client_feats: list[torch.Tensor], client_labels: list[torch.Tensor],
                         num_classes: int, ridge_lambda: float,
                         scales: tuple[float, ...] = LOGIT_SCALES) -> HeadFit:
    """The ridge head from per-client statistics, with a federated choice of logit scale.

    `client_feats[k]` / `client_labels[k]` are client k's own features and
    labels; nothing but A_k, b_k and a vector of loss sums leaves a client.
    """
    dim = client_feats[0].shape[1] + 1
    a_sum = torch.zeros(dim, dim, dtype=torch.float64, device=client_feats[0].device)
    b_sum = torch.zeros(dim, num_classes, dtype=torch.float64, device=client_feats[0].device)
    for feats, labels in zip(client_feats, client_labels):
        a_k, b_k = ridge_statistics(feats, labels, num_classes)
        a_sum += a_k
        b_sum += b_k
    weight, bias = solve_ridge(a_sum, b_sum, ridge_lambda)
    loss_sums = sum(_scaled_loss_sums(f, y, weight, bias, scales) for f, y in zip(client_feats, client_labels))
    best = int(torch.argmin(loss_sums))
    count = sum(len(y) for y in client_labels)
    info = {"ridge_lambda": ridge_lambda, "logit_scale": scales[best],
            "train_loss_at_scale": float(loss_sums[best]) / count}
    return HeadFit((scales[best] * weight).float(), (scales[best] * bias).float(), info)


def _scaled_loss_sums(feats, labels, weight, bias, scales) -> torch.Tensor:
    logits = feats.double() @ weight.T + bias
    return torch.stack([F.cross_entropy(s * logits, labels, reduction="sum") for s in scales])


def _with_bias(feats: torch.Tensor) -> torch.Tensor:
    return torch.cat([feats, torch.ones(feats.shape[0], 1, dtype=feats.dtype, device=feats.device)], dim=1)


def federated_linear_probe(client_feats: list[torch.Tensor], client_labels: list[torch.Tensor],
                           num_classes: int, rounds: int, local_steps: int, clients_per_round: int,
                           batch_size: int, lr: float, seed: int, momentum: float = 0.9) -> HeadFit:
    """A linear head trained by FedAvg on cached frozen features.

    Each round samples `clients_per_round` clients; each runs `local_steps`
    SGD-momentum steps from the global head; the server averages weighted by
    sample counts. With one client holding all data this is plain SGD.
    """
    dim = client_feats[0].shape[1]
    device = client_feats[0].device
    weight = torch.zeros(num_classes, dim, device=device)
    bias = torch.zeros(num_classes, device=device)
    sizes = np.array([len(y) for y in client_labels])
    for round_index in range(rounds):
        rng = numpy_rng(seed, "probe-round", round_index)
        chosen = rng.choice(len(client_feats), size=min(clients_per_round, len(client_feats)), replace=False)
        new_weight, new_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for client in chosen:
            w_k, b_k = _probe_client(client_feats[client], client_labels[client], weight, bias,
                                     local_steps, batch_size, lr, momentum,
                                     numpy_rng(seed, "probe-client", round_index, int(client)))
            share = sizes[client] / sizes[chosen].sum()
            new_weight += share * w_k
            new_bias += share * b_k
        weight, bias = new_weight, new_bias
    return HeadFit(weight, bias, {"probe_rounds": rounds, "probe_lr": lr})


def _probe_client(feats, labels, weight, bias, steps, batch_size, lr, momentum, rng):
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum)
    for _ in range(steps):
        index = torch.as_tensor(rng.choice(len(labels), size=min(batch_size, len(labels)), replace=False),
                                device=feats.device)
        loss = F.cross_entropy(feats[index] @ weight.T + bias, labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()
