"""Fine-tuning set-up: spec validation, federated Fisher and head, the head cache, reuse on resume."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from fedta_utils import prepare as preparation
from fedta_utils.checks import ConfigError
from fedta_utils.data import make_batch
from fedta_utils.fisher import fisher_scores
from fedta_utils.masks import mask_sparsity
from fedta_utils.models import backbone_parameter_names, build_model
from fedta_utils.prepare import (
    RIDGE_LAMBDAS,
    FineTuneSpec,
    choose_ridge_lambda,
    head_cache_path,
    install_head,
    load_prepared,
    prepare,
)
from fedta_utils.sharding import non_iid_shards


@pytest.fixture
def open_run():
    """Opens runs (their lock held, as during training) and closes them after the test."""
    opened = []

    def opener(workspace, name="prep"):
        run = workspace.run(name, {"name": name})
        opened.append(run.__enter__())
        return run

    yield opener
    for run in opened:
        run.__exit__(None, None, None)


def whole_train_split(data) -> list[np.ndarray]:
    return [np.arange(len(data.train))]  # centralized: one client holds everything


def client_shards(data) -> list[np.ndarray]:
    return non_iid_shards(data.train_labels_numpy(), 20, 5, seed=0)


def refuse(*args, **kwargs):
    raise AssertionError("computed again")


# ------------------------------------------------------------------ the spec


def test_spec_identity_keeps_only_the_fields_that_matter():
    dense = FineTuneSpec(head="ridge").identity()
    assert "sparsity" not in dense and "calibration_rounds" not in dense and dense["ridge_lambda"] == 1.0
    masked = FineTuneSpec(head="train", mask_rule="random", sparsity=0.5).identity()
    assert masked["sparsity"] == 0.5 and "ridge_lambda" not in masked


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("head", "frozen", "head='frozen'"),
        ("head", "probe", "head='probe'"),
        ("mask_rule", "largest", "mask_rule='largest'"),
        ("sparsity", 1.0, "sparsity"),
        ("calibration_rounds", 0, "calibration_rounds"),
        ("eligible", "attention", "eligible='attention'"),
        ("max_grad_norm", 0.0, "max_grad_norm=0 is out of range"),
        ("max_grad_norm", -1.0, "max_grad_norm=-1 is out of range"),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FineTuneSpec(**{field: value})


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "ridge_lambda=0 is out of range"),
        (-1.0, "ridge_lambda=-1 is out of range"),
        (math.inf, "ridge_lambda=inf must be a finite number"),
        (math.nan, "ridge_lambda=nan must be a finite number"),
        ("1.0", "ridge_lambda must be a number"),
        (True, "ridge_lambda must be a number"),
    ],
)
def test_spec_refuses_bad_ridge_lambdas_by_name(value, message):
    with pytest.raises(ConfigError, match=message):
        FineTuneSpec(head="ridge", ridge_lambda=value)


def test_a_penalty_chosen_on_validation_is_part_of_the_identity():
    assert FineTuneSpec(head="ridge", ridge_lambda=None).identity()["ridge_lambda"] is None
    assert FineTuneSpec(head="ridge", ridge_lambda=0.1).identity()["ridge_lambda"] == 0.1
    assert "ridge_lambda" not in FineTuneSpec(head="train", ridge_lambda=None).identity()


def test_a_gradient_norm_bound_is_part_of_the_identity_only_when_set():
    """Runs that never clip keep the identity they had before the field existed."""
    assert "max_grad_norm" not in FineTuneSpec(head="ridge").identity()
    assert FineTuneSpec(head="ridge", max_grad_norm=1.0).identity()["max_grad_norm"] == 1.0
    assert str(FineTuneSpec(max_grad_norm=1).identity()["max_grad_norm"]) == "1.0"  # 1 and 1.0: one id


def test_eligible_sets_narrow_the_backbone_to_blocks_and_their_matrices():
    model = build_model("tiny_vit", 10)
    params = dict(model.named_parameters())
    backbone = preparation.eligible_names(model, "backbone")
    blocks = preparation.eligible_names(model, "blocks")
    matrices = preparation.eligible_names(model, "matrices")
    assert backbone == backbone_parameter_names(model) and "cls_token" in backbone
    assert blocks == [n for n in backbone if n.startswith("blocks.")]
    assert matrices == [n for n in blocks if params[n].ndim == 2]
    assert len(matrices) == 4 * 4  # qkv, proj, fc1, fc2 in each of the 4 blocks


# ------------------------------------------------------------------ federated Fisher and calibration samples


def test_federated_fisher_is_the_fisher_of_the_union_of_client_samples(small_data):
    model = build_model("tiny_vit", 100)
    names = backbone_parameter_names(model)
    samples = [np.arange(0, 40), np.arange(500, 530), np.arange(1000, 1050)]
    federated = preparation.federated_fisher(small_data, samples, 32, "true", names=names, seed=0)(model)
    union = torch.as_tensor(np.concatenate(samples))
    central = fisher_scores(model, [make_batch(small_data.train, union, 32)], "true", names)
    for name in names:
        torch.testing.assert_close(federated[name], central[name], rtol=1e-4, atol=1e-10, msg=name)


def test_calibration_samples_come_from_each_clients_own_shard(small_data):
    shards = client_shards(small_data)
    samples = preparation.calibration_samples(shards, total=95, seed=0)
    assert len(samples) == 20
    for shard, chosen in zip(shards, samples):
        assert len(chosen) == 5 and len(set(chosen)) == 5 and set(chosen) <= set(shard)


# ------------------------------------------------------------------ prepare


def test_federated_ridge_head_equals_the_centralized_ridge_head(workspace, small_data, open_run):
    spec = FineTuneSpec(head="ridge")
    central_model, fed_model = build_model("tiny_vit", 100), build_model("tiny_vit", 100)
    prepare(
        open_run(workspace, "central"),
        central_model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=whole_train_split(small_data),
        head_cache=None,
    )
    prepare(
        open_run(workspace, "fed"),
        fed_model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    torch.testing.assert_close(central_model.head.weight, fed_model.head.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(central_model.head.bias, fed_model.head.bias, atol=1e-4, rtol=1e-4)


def test_global_masks_reach_the_target_sparsity_and_freeze_the_head(workspace, small_data, open_run):
    spec = FineTuneSpec(
        head="ridge", mask_rule="least_sensitive", sparsity=0.7, calibration_rounds=2, calibration_samples=50
    )
    prepared = prepare(
        open_run(workspace),
        build_model("tiny_vit", 100),
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    assert mask_sparsity(prepared.masks) == pytest.approx(0.7, abs=1e-5)
    assert prepared.info["achieved_sparsity"] == pytest.approx(0.7, abs=1e-5)
    assert not any(name.startswith("head.") for name in prepared.trainable_names)


def test_a_trained_head_is_trainable_and_untouched_by_prepare(workspace, small_data, open_run):
    model = build_model("tiny_vit", 100, head_seed=2)
    before = model.head.weight.detach().clone()
    prepared = prepare(
        open_run(workspace),
        model,
        small_data,
        FineTuneSpec(head="train"),
        seed=0,
        img_size=32,
        precision="fp32",
        shards=whole_train_split(small_data),
        head_cache=None,
    )
    assert prepared.trainable_names == [n for n, _ in model.named_parameters()] and prepared.masks is None
    assert torch.equal(model.head.weight, before)


def test_a_resumed_run_reads_prepared_pt_back_without_calibrating(
    workspace, small_data, monkeypatch, open_run
):
    spec = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.5, calibration_rounds=1)
    run = open_run(workspace)
    first_model = build_model("tiny_vit", 100)
    first = prepare(
        run,
        first_model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    monkeypatch.setattr(preparation, "calibrate", refuse)
    monkeypatch.setattr(preparation, "federated_ridge_head", refuse)
    model = build_model("tiny_vit", 100)
    again = prepare(
        run,
        model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    assert again.trainable_names == first.trainable_names and again.info == first.info
    assert all(torch.equal(first.masks[n], again.masks[n]) for n in first.masks)
    assert torch.equal(model.head.weight, first_model.head.weight)
    assert torch.equal(load_prepared(run.dir).masks["cls_token"], first.masks["cls_token"])


def test_a_ridge_head_is_fitted_once_and_shared_through_the_head_cache(
    workspace, small_data, monkeypatch, open_run
):
    spec = FineTuneSpec(head="ridge")
    cache = head_cache_path(workspace.root, spec, model="tiny_vit", dataset="synthetic", sharding="nc5")
    first_model, second_model = build_model("tiny_vit", 100), build_model("tiny_vit", 100)
    prepare(
        open_run(workspace, "first"),
        first_model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=cache,
    )
    assert cache.is_file()
    monkeypatch.setattr(preparation, "federated_ridge_head", refuse)
    other_masks = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.5, calibration_rounds=1)
    prepare(
        open_run(workspace, "second"),
        second_model,
        small_data,
        other_masks,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=cache,
    )
    assert torch.equal(second_model.head.weight, first_model.head.weight)
    assert torch.equal(second_model.head.bias, first_model.head.bias)


def test_an_unreadable_head_cache_entry_is_fitted_again(workspace, small_data, open_run):
    spec = FineTuneSpec(head="ridge")
    cache = head_cache_path(workspace.root, spec, model="tiny_vit")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"half a file")
    model = build_model("tiny_vit", 100)
    prepared = prepare(
        open_run(workspace),
        model,
        small_data,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=whole_train_split(small_data),
        head_cache=cache,
    )
    stored = torch.load(cache, weights_only=True)
    assert torch.equal(stored["weight"], model.head.weight.detach())
    assert stored["info"]["logit_scale"] == prepared.info["logit_scale"]


def test_the_head_cache_key_is_what_the_head_depends_on():
    ridge, other_lambda = FineTuneSpec(head="ridge"), FineTuneSpec(head="ridge", ridge_lambda=0.1)
    masked = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.5)
    path = head_cache_path("/r", ridge, model="tiny_vit", sharding="iid")
    assert path == head_cache_path("/r", masked, model="tiny_vit", sharding="iid")  # masks come after step 0
    assert path != head_cache_path("/r", other_lambda, model="tiny_vit", sharding="iid")
    assert path != head_cache_path("/r", ridge, model="tiny_vit", sharding="nc5")
    assert head_cache_path("/r", FineTuneSpec(head="train"), model="tiny_vit") is None


def test_fedavg_runs_that_differ_only_in_training_share_one_cached_head(workspace):
    from fedta_utils.fedavg import FedAvgConfig

    def config(**overrides):
        values = dict(dataset="synthetic", model="tiny_vit", finetune=FineTuneSpec(head="ridge"), **overrides)
        return FedAvgConfig(**values)

    shared = config(local_steps=1).head_cache(workspace)
    assert shared == config(local_steps=8, rounds=5, lr=0.1).head_cache(workspace)
    assert shared != config(seed=1).head_cache(workspace)  # other shards
    assert shared != config(sharding="non_iid", classes_per_client=5).head_cache(workspace)


def test_a_head_chosen_on_validation_has_its_own_cache_entry():
    chosen = head_cache_path("/r", FineTuneSpec(head="ridge", ridge_lambda=None), model="tiny_vit")
    fixed = {
        head_cache_path("/r", FineTuneSpec(head="ridge", ridge_lambda=lam), model="tiny_vit")
        for lam in RIDGE_LAMBDAS
    }
    assert chosen not in fixed and len(fixed) == len(RIDGE_LAMBDAS)
    assert chosen == head_cache_path(
        "/r", FineTuneSpec(head="ridge", ridge_lambda=None, mask_rule="random"), model="tiny_vit"
    )


def test_prepare_chooses_the_penalty_on_validation_never_on_test(workspace, small_data, open_run):
    no_test = dataclasses.replace(small_data, test=None)  # the test split must never be read
    chosen_model, fixed_model = build_model("tiny_vit", 100), build_model("tiny_vit", 100)
    spec = FineTuneSpec(head="ridge", ridge_lambda=None)
    chosen = prepare(
        open_run(workspace, "chosen"),
        chosen_model,
        no_test,
        spec,
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    accuracies = chosen.info["val_accuracy_per_lambda"]
    assert list(accuracies) == [f"{lam:g}" for lam in RIDGE_LAMBDAS]
    assert chosen.info["ridge_lambda"] == choose_ridge_lambda(RIDGE_LAMBDAS, list(accuracies.values()))
    assert json.loads(json.dumps(chosen.info)) == chosen.info
    fixed = prepare(
        open_run(workspace, "fixed"),
        fixed_model,
        no_test,
        FineTuneSpec(head="ridge", ridge_lambda=chosen.info["ridge_lambda"]),
        seed=0,
        img_size=32,
        precision="fp32",
        shards=client_shards(small_data),
        head_cache=None,
    )
    assert fixed.info["logit_scale"] == chosen.info["logit_scale"]
    assert "val_accuracy_per_lambda" not in fixed.info
    torch.testing.assert_close(chosen_model.head.weight, fixed_model.head.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen_model.head.bias, fixed_model.head.bias, atol=1e-6, rtol=1e-6)


def test_a_fixed_penalty_never_reads_the_validation_split(workspace, small_data, open_run):
    no_val = dataclasses.replace(small_data, val=None, test=None)
    prepared = prepare(
        open_run(workspace),
        build_model("tiny_vit", 100),
        no_val,
        FineTuneSpec(head="ridge", ridge_lambda=0.1),
        seed=0,
        img_size=32,
        precision="fp32",
        shards=whole_train_split(small_data),
        head_cache=None,
    )
    assert prepared.info["ridge_lambda"] == 0.1


def test_installed_head_is_the_given_one():
    model = build_model("tiny_vit", 10)
    weight, bias = torch.randn(10, model.num_features, dtype=torch.float64), torch.randn(10)
    install_head(model, weight, bias)
    assert torch.equal(model.get_classifier().weight.detach(), weight.float())
    assert torch.equal(model.get_classifier().bias.detach(), bias)
