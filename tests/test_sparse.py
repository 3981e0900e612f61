"""Sparse fine-tuning set-up: spec validation, federated Fisher and head, local masks, reuse on resume."""

import numpy as np
import pytest
import torch

from fedta_utils import sparse
from fedta_utils.checks import ConfigError
from fedta_utils.data import make_batch
from fedta_utils.masks import mask_sparsity
from fedta_utils.sensitivity import fisher_scores
from fedta_utils.sharding import non_iid_shards
from fedta_utils.sparse import FineTuneSpec, prepare_centralized, prepare_federated


@pytest.fixture
def open_run():
    """Opens runs (their lock held, as during training) and closes them after the test."""
    opened = []

    def opener(workspace, name="prep"):
        run = workspace.run("tests", name, {"name": name})
        opened.append(run.__enter__())
        return run

    yield opener
    for run in opened:
        run.__exit__(None, None, None)


def test_spec_identity_keeps_only_the_fields_that_matter():
    dense = FineTuneSpec(head="ridge").identity()
    assert "sparsity" not in dense and "probe_lr" not in dense and dense["ridge_lambda"] == 1.0
    masked = FineTuneSpec(head="train", mask_rule="random", sparsity=0.5).identity()
    assert masked["sparsity"] == 0.5 and "ridge_lambda" not in masked


@pytest.mark.parametrize("field, value, message", [
    ("head", "frozen", "head='frozen'"),
    ("mask_rule", "largest", "mask_rule='largest'"),
    ("sparsity", 1.0, "sparsity"),
    ("calibration_rounds", 0, "calibration_rounds"),
    ("eligible", "attention", "eligible='attention'"),
    ("mask_scope", "client", "mask_scope='client'"),
])
def test_spec_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FineTuneSpec(**{field: value})


def test_federated_fisher_is_the_fisher_of_the_union_of_client_samples(small_data):
    from fedta_utils.models import build_model, backbone_parameter_names

    model = build_model("tiny_vit", 100)
    names = backbone_parameter_names(model)
    samples = {0: np.arange(0, 40), 3: np.arange(500, 530), 7: np.arange(1000, 1050)}
    score_fn = sparse._fisher_score_fn(small_data, samples, 32, "true", names, seed=0)
    federated = score_fn(model)
    union = torch.as_tensor(np.concatenate(list(samples.values())))
    central = fisher_scores(model, [make_batch(small_data.train, union, 32)], "true", names)
    for name in names:
        assert torch.allclose(federated[name], central[name], rtol=1e-4, atol=1e-10), name


def test_calibration_samples_come_from_each_clients_own_shard(small_data):
    shards = non_iid_shards(small_data.train_labels_numpy(), 20, 5, seed=0)
    samples = sparse._calibration_samples(shards, total=95, seed=0)
    assert len(samples) == 20
    for shard, chosen in zip(shards, samples):
        assert len(chosen) == 5 and set(chosen) <= set(shard)


def test_federated_ridge_head_equals_the_centralized_ridge_head(workspace, small_data, open_run):
    from fedta_utils.models import build_model

    spec = FineTuneSpec(head="ridge")
    central_model, fed_model = build_model("tiny_vit", 100), build_model("tiny_vit", 100)
    prepare_centralized(open_run(workspace, "central"), central_model, small_data, spec, 0, 32, "fp32")
    shards = non_iid_shards(small_data.train_labels_numpy(), 20, 5, seed=0)
    prepare_federated(open_run(workspace, "fed"), fed_model, small_data, spec, 0, 32, "fp32", shards, 5)
    assert torch.allclose(central_model.head.weight, fed_model.head.weight, atol=1e-4, rtol=1e-4)
    assert torch.allclose(central_model.head.bias, fed_model.head.bias, atol=1e-4, rtol=1e-4)


def test_global_masks_reach_the_target_sparsity_and_freeze_the_head(workspace, small_data, open_run):
    from fedta_utils.models import build_model

    model = build_model("tiny_vit", 100)
    spec = FineTuneSpec(head="ridge", mask_rule="least_sensitive", sparsity=0.7, calibration_rounds=2,
                        calibration_samples=50)
    shards = non_iid_shards(small_data.train_labels_numpy(), 20, 5, seed=0)
    prepared = prepare_federated(open_run(workspace), model, small_data, spec, 0, 32, "fp32", shards, 3)
    assert mask_sparsity(prepared.masks) == pytest.approx(0.7, abs=1e-5)
    assert not any(name.startswith("head.") for name in prepared.trainable_names)


def test_local_masks_are_per_client_and_differ_under_non_iid_data(workspace, small_data, open_run):
    from fedta_utils.models import build_model

    model = build_model("tiny_vit", 100)
    spec = FineTuneSpec(head="ridge", mask_rule="least_sensitive", sparsity=0.9, calibration_rounds=1,
                        calibration_samples=40, mask_scope="local")
    shards = non_iid_shards(small_data.train_labels_numpy(), 20, 5, seed=0)
    prepared = prepare_federated(open_run(workspace), model, small_data, spec, 0, 32, "fp32", shards, 2)
    first, second = prepared.masks_for_client(0, "cpu"), prepared.masks_for_client(1, "cpu")
    assert mask_sparsity(first) == pytest.approx(0.9, abs=1e-5)
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_a_resumed_run_reuses_its_stored_masks_without_calibrating(workspace, small_data, monkeypatch, open_run):
    from fedta_utils.models import build_model

    spec = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.5, calibration_rounds=1)
    run = open_run(workspace)
    first = prepare_centralized(run, build_model("tiny_vit", 100), small_data, spec, 0, 32, "fp32")

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated twice")

    monkeypatch.setattr(sparse, "calibrate", refuse)
    monkeypatch.setattr(sparse, "federated_ridge_head", refuse)
    again = prepare_centralized(run, build_model("tiny_vit", 100), small_data, spec, 0, 32, "fp32")
    assert all(torch.equal(first.masks[n], again.masks[n]) for n in first.masks)


def test_magnitude_rules_with_local_scope_are_refused():
    from fedta_utils.federated import FedAvgConfig

    with pytest.raises(ConfigError, match="mask_scope='local' with a magnitude rule"):
        FedAvgConfig(dataset="synthetic", model="tiny_vit", finetune=FineTuneSpec(
            mask_rule="lowest_magnitude", mask_scope="local"))
