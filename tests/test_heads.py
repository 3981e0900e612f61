"""Step-0 heads: the federated ridge head equals the centralized one; the logit scale; the penalty chosen
on validation; client features."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedta_utils.prepare import (
    LAMBDA_TOLERANCE,
    LOGIT_SCALES,
    RIDGE_LAMBDAS,
    choose_ridge_lambda,
    client_features,
    federated_ridge_head,
    ridge_statistics,
    solve_ridge,
)
from fedta_utils.sharding import iid_shards, non_iid_shards


@pytest.fixture(scope="module")
def features_and_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10
    centres = torch.randn(10, 16, generator=generator) * 2
    feats = centres[labels] + torch.randn(600, 16, generator=generator)
    return feats, labels


def split(feats, labels, shards):
    return [feats[torch.as_tensor(s)] for s in shards], [labels[torch.as_tensor(s)] for s in shards]


def test_ridge_solution_matches_the_normal_equations_with_a_relative_penalty(features_and_labels):
    feats, labels = features_and_labels
    a, b = ridge_statistics(feats, labels, 10)
    weight, bias = solve_ridge(a, b, ridge_lambda=0.5)
    phi = np.hstack([feats.double().numpy(), np.ones((600, 1))])
    targets = np.eye(10)[labels.numpy()]
    penalty = 0.5 * np.trace(phi.T @ phi) / 17  # relative to the mean eigenvalue
    solution = np.linalg.solve(phi.T @ phi + penalty * np.eye(17), phi.T @ targets)
    assert np.allclose(weight.numpy(), solution[:-1].T, atol=1e-10)
    assert np.allclose(bias.numpy(), solution[-1], atol=1e-10)


@pytest.mark.parametrize("sharding", ["iid", "non_iid"])
def test_federated_ridge_head_equals_the_centralized_one_for_any_client_order(features_and_labels, sharding):
    feats, labels = features_and_labels
    shards = (
        iid_shards(labels.numpy(), 12, seed=0)
        if sharding == "iid"
        else non_iid_shards(labels.numpy(), 12, 2, seed=0)
    )
    central = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    client_feats, client_labels = split(feats, labels, shards)
    federated = federated_ridge_head(client_feats, client_labels, 10, ridge_lambda=1.0)
    order = np.random.default_rng(1).permutation(len(shards))
    shuffled = federated_ridge_head(
        [client_feats[i] for i in order], [client_labels[i] for i in order], 10, 1.0
    )
    for weight, bias, info in (federated, shuffled):
        assert info["logit_scale"] == central[2]["logit_scale"]
        torch.testing.assert_close(weight, central[0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(bias, central[1], atol=1e-5, rtol=1e-6)


def test_logit_scale_is_the_grid_value_with_the_lowest_training_loss(features_and_labels):
    feats, labels = features_and_labels
    _, _, info = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    a, b = ridge_statistics(feats, labels, 10)
    weight, bias = solve_ridge(a, b, 1.0)
    logits = feats.double() @ weight.T + bias
    losses = [F.cross_entropy(s * logits, labels).item() for s in LOGIT_SCALES]
    assert info["logit_scale"] == LOGIT_SCALES[int(np.argmin(losses))]
    assert info["logit_scale"] > 1.0  # one-hot regression logits need sharpening


def test_ridge_head_is_the_scaled_solution_and_classifies_separable_features(features_and_labels):
    feats, labels = features_and_labels
    weight, bias, info = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    solution, offset = solve_ridge(*ridge_statistics(feats, labels, 10), 1.0)
    torch.testing.assert_close(weight, (info["logit_scale"] * solution).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, (info["logit_scale"] * offset).float(), rtol=1e-6, atol=1e-7)
    assert ((feats @ weight.T + bias).argmax(1) == labels).float().mean() > 0.9


def anisotropic(n, seed):
    """10 classes told apart only in 24 low-variance directions, next to 8 loud uninformative ones."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    centres = torch.randn(10, 24, generator=torch.Generator().manual_seed(99))
    informative = (centres[labels] + 1.5 * torch.randn(n, 24, generator=generator)) * 0.1
    return torch.cat([informative, 10 * torch.randn(n, 8, generator=generator)], dim=1), labels


def accuracy(weight, bias, feats, labels) -> float:
    return float(((feats @ weight.T + bias).argmax(1) == labels).float().mean())


def test_a_penalty_chosen_on_validation_is_small_on_anisotropic_features_and_beats_the_fixed_one():
    (feats, labels), (val_feats, val_labels), (held_feats, held_labels) = (
        anisotropic(n, seed) for n, seed in ((1000, 0), (500, 1), (500, 2))
    )
    weight, bias, info = federated_ridge_head(
        [feats], [labels], 10, None, val_feats=val_feats, val_labels=val_labels
    )
    fixed = federated_ridge_head([feats], [labels], 10, 1.0)
    assert info["ridge_lambda"] in RIDGE_LAMBDAS and info["ridge_lambda"] <= 1e-2
    chosen_accuracy = accuracy(weight, bias, held_feats, held_labels)
    assert chosen_accuracy > accuracy(*fixed[:2], held_feats, held_labels) + 0.5


def test_validation_accuracies_are_recorded_per_penalty_and_survive_json(features_and_labels):
    feats, labels = features_and_labels
    val_feats, val_labels = feats[:200] + 0.5, labels[:200]
    _, _, info = federated_ridge_head([feats], [labels], 10, None, val_feats=val_feats, val_labels=val_labels)
    a, b = ridge_statistics(feats, labels, 10)
    expected = {
        f"{lam:g}": accuracy(*solve_ridge(a, b, lam), val_feats.double(), val_labels) for lam in RIDGE_LAMBDAS
    }
    assert info["val_accuracy_per_lambda"] == pytest.approx(expected, abs=1e-6)
    assert json.loads(json.dumps(info)) == info
    assert info["ridge_lambda"] == choose_ridge_lambda(RIDGE_LAMBDAS, list(expected.values()))


def test_a_fixed_penalty_needs_no_validation_data(features_and_labels):
    feats, labels = features_and_labels
    _, _, info = federated_ridge_head([feats], [labels], 10, 0.1)
    assert info["ridge_lambda"] == 0.1 and "val_accuracy_per_lambda" not in info


@pytest.mark.parametrize("sharding", ["iid", "non_iid"])
def test_the_head_with_a_chosen_penalty_equals_the_centralized_one_for_any_client_order(sharding):
    (feats, labels), (val_feats, val_labels) = anisotropic(1000, 0), anisotropic(500, 1)
    shards = (
        iid_shards(labels.numpy(), 12, seed=0)
        if sharding == "iid"
        else non_iid_shards(labels.numpy(), 12, 2, seed=0)
    )
    client_feats, client_labels = split(feats, labels, shards)
    order = np.random.default_rng(1).permutation(len(shards))
    chosen = federated_ridge_head([feats], [labels], 10, None, val_feats=val_feats, val_labels=val_labels)
    solution, offset = solve_ridge(*ridge_statistics(feats, labels, 10), chosen[2]["ridge_lambda"])
    scale = chosen[2]["logit_scale"]
    for client_order in (range(len(shards)), order):
        weight, bias, info = federated_ridge_head(
            [client_feats[i] for i in client_order],
            [client_labels[i] for i in client_order],
            10,
            None,
            val_feats=val_feats,
            val_labels=val_labels,
        )
        assert info["ridge_lambda"] == chosen[2]["ridge_lambda"] and info["logit_scale"] == scale
        assert info["val_accuracy_per_lambda"] == chosen[2]["val_accuracy_per_lambda"]
        torch.testing.assert_close(weight, (scale * solution).float(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bias, (scale * offset).float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "accuracies, tolerance, chosen",
    [
        ([0.80, 0.80, 0.80, 0.80, 0.80], LAMBDA_TOLERANCE, 1.0),  # a tie goes to the largest penalty
        ([0.90, 0.85, 0.80, 0.70, 0.50], LAMBDA_TOLERANCE, 1e-4),  # a clear gain takes the small one
        ([0.900, 0.905, 0.898, 0.70, 0.50], LAMBDA_TOLERANCE, 1e-2),  # within the tolerance: the largest
        ([0.900, 0.905, 0.898, 0.70, 0.50], 0.0, 1e-3),  # no tolerance: the best one
        ([0.30, 0.50, 0.50, 0.40, 0.20], 0.0, 1e-2),  # ... and ties still go to the larger
        ([0.30, 0.50, 0.50, 0.40, 0.35], 0.2, 1.0),  # a wide tolerance reaches the largest
    ],
)
def test_the_choice_is_the_largest_penalty_within_the_tolerance_of_the_best(accuracies, tolerance, chosen):
    assert choose_ridge_lambda(RIDGE_LAMBDAS, accuracies, tolerance) == chosen


def test_client_features_are_the_head_inputs(small_data):
    from fedta_utils.data import make_batch
    from fedta_utils.models import build_model

    model = build_model("tiny_vit", 100, head_seed=1)
    index = np.arange(40, 80)
    feats = client_features(model, small_data.train, index, 32, precision="fp32", batch_size=16)
    inputs, _ = make_batch(small_data.train, torch.as_tensor(index), 32)
    assert feats.shape == (40, model.num_features) and feats.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model.head(feats), model.eval()(inputs), rtol=1e-5, atol=1e-5)
