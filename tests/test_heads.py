"""Step-0 heads: the federated ridge head equals the centralized one; probe and logit scale."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedta_utils.heads import (LOGIT_SCALES, federated_linear_probe, federated_ridge_head, ridge_statistics,
                               solve_ridge)
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
    shards = (iid_shards(labels.numpy(), 12, seed=0) if sharding == "iid"
              else non_iid_shards(labels.numpy(), 12, 2, seed=0))
    central = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    client_feats, client_labels = split(feats, labels, shards)
    federated = federated_ridge_head(client_feats, client_labels, 10, ridge_lambda=1.0)
    order = np.random.default_rng(1).permutation(len(shards))
    shuffled = federated_ridge_head([client_feats[i] for i in order], [client_labels[i] for i in order], 10, 1.0)
    for fit in (federated, shuffled):
        assert fit.info["logit_scale"] == central.info["logit_scale"]
        assert torch.allclose(fit.weight, central.weight, atol=1e-5, rtol=1e-6)
        assert torch.allclose(fit.bias, central.bias, atol=1e-5, rtol=1e-6)


def test_logit_scale_is_the_grid_value_with_the_lowest_training_loss(features_and_labels):
    feats, labels = features_and_labels
    fit = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    a, b = ridge_statistics(feats, labels, 10)
    weight, bias = solve_ridge(a, b, 1.0)
    logits = feats.double() @ weight.T + bias
    losses = [F.cross_entropy(s * logits, labels).item() for s in LOGIT_SCALES]
    assert fit.info["logit_scale"] == LOGIT_SCALES[int(np.argmin(losses))]
    assert fit.info["logit_scale"] > 1.0  # one-hot regression logits need sharpening


def test_ridge_head_classifies_separable_features(features_and_labels):
    feats, labels = features_and_labels
    fit = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    accuracy = ((feats @ fit.weight.T + fit.bias).argmax(1) == labels).float().mean()
    assert accuracy > 0.9


def test_linear_probe_learns_a_head_from_client_features(features_and_labels):
    feats, labels = features_and_labels
    shards = iid_shards(labels.numpy(), 6, seed=0)
    client_feats, client_labels = split(feats, labels, shards)
    fit = federated_linear_probe(client_feats, client_labels, 10, rounds=30, local_steps=4, clients_per_round=3,
                                 batch_size=32, lr=0.1, seed=0)
    accuracy = ((feats @ fit.weight.T + fit.bias).argmax(1) == labels).float().mean()
    assert accuracy > 0.8


def test_installed_head_is_the_fitted_one(features_and_labels):
    from fedta_utils.models import build_model

    feats, labels = features_and_labels
    fit = federated_ridge_head([feats], [labels], 10, ridge_lambda=1.0)
    model = build_model("tiny_vit", 10)
    fit.weight = torch.randn(10, model.num_features)
    fit.install(model)
    assert torch.equal(model.get_classifier().weight.detach(), fit.weight)
