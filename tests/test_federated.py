"""FedAvg engine: the FedSGD identity, exact aggregation, paired client sampling, accounting."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedta_utils.checks import ConfigError
from fedta_utils.data import normalize_resize
from fedta_utils.federated import (FedAvgConfig, clients_per_round, client_batch_indices, run_fedavg,
                                   sample_clients, server_step)
from fedta_utils.sparse import FineTuneSpec

TINY = dict(dataset="synthetic", model="tiny_vit")


def tiny_config(**overrides) -> FedAvgConfig:
    values = dict(TINY, num_clients=6, participation=0.5, local_steps=2, rounds=3, batch_size=16, lr=0.05,
                  eval_every=2)
    values.update(overrides)
    return FedAvgConfig(**values)


def load_weights(result) -> dict:
    return torch.load(result.run.dir / "model.pt", weights_only=True)


# ------------------------------------------------------------------ the FedSGD identity

def test_one_round_with_full_participation_and_full_batches_is_one_full_batch_gradient_step(workspace, small_data):
    """C=1, J=1, B = shard size, no momentum, no weight decay, no augmentation: FedAvg == full-batch GD."""
    num_clients = 4  # 1,800 images: four shards of 450
    config = tiny_config(num_clients=num_clients, participation=1.0, local_steps=1, rounds=1, batch_size=450,
                         momentum=0.0, weight_decay=0.0, augment=False, lr=0.5, seed=3)
    result = run_fedavg(workspace, small_data, config, save_weights=True, progress=False)

    model = workspace.build_model("tiny_vit", 100, head_seed=3)
    model.train()
    inputs = normalize_resize(small_data.train.images, 32)
    loss = F.cross_entropy(model(inputs), small_data.train.labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    fedavg = load_weights(result)
    for (name, param), grad in zip(model.named_parameters(), grads):
        expected = param.detach() - 0.5 * grad
        assert torch.allclose(fedavg[name], expected, atol=1e-5, rtol=0), name


# ------------------------------------------------------------------ aggregation

def test_server_step_weights_client_deltas_by_sample_count():
    from fedta_utils.drift import DeltaStats

    stats = DeltaStats(3, "cpu", dtype=torch.float64)
    deltas = {100: [1.0, 0.0, -2.0], 300: [0.0, 4.0, 2.0], 50: [8.0, 8.0, 8.0]}
    for weight, delta in deltas.items():
        stats.add(torch.tensor(delta, dtype=torch.float64), weight)
    weights = torch.zeros(3, dtype=torch.float64)
    server_step(weights, stats.average_delta(), None, server_lr=1.0, server_momentum=0.0)
    expected = (100 * np.array(deltas[100]) + 300 * np.array(deltas[300]) + 50 * np.array(deltas[50])) / 450
    assert np.allclose(weights.numpy(), expected, atol=1e-15)


def test_server_learning_rate_scales_the_step():
    weights = torch.ones(2)
    server_step(weights, torch.tensor([1.0, -1.0]), None, server_lr=0.5, server_momentum=0.0)
    assert torch.equal(weights, torch.tensor([1.5, 0.5]))


def test_server_momentum_accumulates_like_fedavgm():
    weights, velocity = torch.zeros(1), torch.zeros(1)
    for delta in (1.0, 1.0, -1.0):
        server_step(weights, torch.tensor([delta]), velocity, server_lr=1.0, server_momentum=0.5)
    # v: 1, 1.5, -0.25; w: 1, 2.5, 2.25
    assert velocity.item() == pytest.approx(-0.25) and weights.item() == pytest.approx(2.25)


# ------------------------------------------------------------------ sampling and batches

def test_clients_per_round_follows_max_one_round_c_times_k():
    assert clients_per_round(100, 0.1) == 10
    assert clients_per_round(100, 0.001) == 1
    assert clients_per_round(7, 1.0) == 7


def test_sampled_clients_are_distinct_and_reproducible():
    first = sample_clients(seed=5, round_index=3, num_clients=100, participation=0.1)
    assert len(first) == 10 and len(set(first)) == 10
    assert np.array_equal(first, sample_clients(5, 3, 100, 0.1))
    assert not np.array_equal(first, sample_clients(5, 4, 100, 0.1))


def test_runs_with_the_same_seed_and_different_j_sample_the_same_clients(workspace, small_data):
    short = run_fedavg(workspace, small_data, tiny_config(local_steps=1, rounds=3, seed=9), progress=False)
    long = run_fedavg(workspace, small_data, tiny_config(local_steps=4, rounds=3, seed=9), progress=False)
    assert short.metrics["clients"].tolist() == long.metrics["clients"].tolist()
    assert short.metrics["train_loss"].tolist() != long.metrics["train_loss"].tolist()


def test_client_batches_walk_through_reshuffled_passes_of_the_shard():
    shard = np.arange(100, 130)  # 30 samples
    positions = client_batch_indices(shard, local_steps=4, batch_size=16, seed=0, round_index=2, client=7)
    assert positions.shape == (4, 16)
    flat = positions.reshape(-1)
    assert sorted(flat[:30]) == list(shard), "the first pass is a permutation of the shard"
    assert set(flat[30:]) <= set(shard)
    again = client_batch_indices(shard, 4, 16, seed=0, round_index=2, client=7)
    assert np.array_equal(positions, again)


def test_client_batch_is_capped_at_the_shard_size():
    positions = client_batch_indices(np.arange(5), local_steps=2, batch_size=32, seed=0, round_index=0, client=0)
    assert positions.shape == (2, 5)
    assert sorted(positions[0]) == list(range(5))


# ------------------------------------------------------------------ metrics, evaluation, accounting

def test_evaluation_happens_every_eval_every_rounds_and_at_the_last(workspace, small_data):
    result = run_fedavg(workspace, small_data, tiny_config(rounds=5, eval_every=2), progress=False)
    evaluated = result.metrics.dropna(subset=["val_acc"])["round"].tolist()
    assert evaluated == [2, 4, 5]
    assert {"test_acc", "test_loss", "val_loss", "mean_pairwise_cosine", "sign_agreement",
            "sign_conflict_fraction", "mean_client_delta_norm", "avg_delta_norm"} <= set(result.metrics.columns)


def test_dense_rounds_send_every_trainable_entry_both_ways(workspace, small_data):
    result = run_fedavg(workspace, small_data, tiny_config(rounds=1), progress=False)
    model = workspace.build_model("tiny_vit", 100, head_seed=0)
    entries = sum(p.numel() for p in model.parameters())
    row = result.metrics.iloc[0]
    assert row["bytes_up"] == row["bytes_down"] == 3 * 4 * entries  # 3 clients, float32


def test_sparse_rounds_upload_only_the_trainable_entries(workspace, small_data):
    spec = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.9, calibration_rounds=1)
    result = run_fedavg(workspace, small_data, tiny_config(rounds=1, finetune=spec), progress=False)
    trainable = result.summary["trainable_entries"]
    model = workspace.build_model("tiny_vit", 100, head_seed=0)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert trainable == round(0.1 * backbone)
    assert result.metrics.iloc[0]["bytes_up"] == 3 * 4 * trainable


def test_frozen_entries_and_a_frozen_head_never_move_during_fedavg(workspace, small_data):
    from fedta_utils.sparse import load_run_masks

    spec = FineTuneSpec(head="ridge", mask_rule="least_sensitive", sparsity=0.8, calibration_rounds=2,
                        calibration_samples=60)
    result = run_fedavg(workspace, small_data, tiny_config(rounds=2, finetune=spec), save_weights=True,
                        progress=False)
    final = load_weights(result)
    masks = load_run_masks(result.run.dir)
    prepared = torch.load(result.run.dir / "prepared.pt", weights_only=True)
    initial = workspace.build_model("tiny_vit", 100, head_seed=0).state_dict()
    assert torch.equal(final["head.weight"], prepared["head"]["weight"])
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], initial[name][~mask]), name
    moved = sum(int((final[n][m] != initial[n][m]).sum()) for n, m in masks.items())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())


def test_a_complete_run_is_read_back_not_recomputed(workspace, small_data, monkeypatch):
    import fedta_utils.federated as federated

    first = run_fedavg(workspace, small_data, tiny_config(rounds=2), progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a complete run must not train again")

    monkeypatch.setattr(federated, "_FedAvgTrainer", refuse)
    again = run_fedavg(workspace, small_data, tiny_config(rounds=2), progress=False)
    assert again.summary == first.summary
    pd.testing.assert_frame_equal(again.metrics, first.metrics)


def test_identical_configs_give_bit_identical_metrics(tmp_path, small_data):
    from fedta_utils.workspace import setup_workspace

    texts = []
    for name in ("a", "b"):
        ws = setup_workspace("smoke", tmp_path / name, device="cpu", download=False)
        result = run_fedavg(ws, small_data, tiny_config(rounds=3), progress=False)
        texts.append((result.run.dir / "metrics.csv").read_bytes())
    assert texts[0] == texts[1]


def test_non_iid_config_needs_classes_per_client():
    with pytest.raises(ConfigError, match="classes_per_client"):
        FedAvgConfig(**TINY, sharding="non_iid")


def test_config_identity_ignores_fields_that_do_not_apply():
    iid = tiny_config().to_dict()
    assert "classes_per_client" not in iid and "dirichlet_alpha" not in iid
    assert "sparsity" not in iid["finetune"] and "ridge_lambda" not in iid["finetune"]
