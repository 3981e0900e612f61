"""FedAvg: the FedSGD identity, exact aggregation, paired client sampling, drift statistics, accounting."""

import contextlib
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedta_utils import fedavg, models
from fedta_utils.checks import ConfigError
from fedta_utils.data import normalize_resize
from fedta_utils.fedavg import (
    DeltaStats,
    FedAvgConfig,
    client_batch_indices,
    clients_per_round,
    run_fedavg,
    sample_clients,
    server_update,
)
from fedta_utils.prepare import FineTuneSpec, load_prepared

TINY = dict(dataset="synthetic", model="tiny_vit")


def tiny_config(**overrides) -> FedAvgConfig:
    values = dict(
        TINY, num_clients=6, participation=0.5, local_steps=2, rounds=3, batch_size=16, lr=0.05, eval_points=2
    )
    values.update(overrides)
    return FedAvgConfig(**values)


class Killed(Exception):
    """Stands for a process killed mid-run."""


def kill_in_round_three(monkeypatch, ws, data, config, round_fn) -> None:
    """Run `config` in `ws` with FedAvgRun.round = round_fn until a kill during round 3 (a run to resume)."""

    def die_in_round_three(self, round_index):
        if round_index == 2:
            raise Killed("during round 3")
        return round_fn(self, round_index)

    monkeypatch.setattr(fedavg.FedAvgRun, "round", die_in_round_three)
    with pytest.raises(Killed):
        run_fedavg(ws, data, config, checkpoint_every=1, save_weights=True, progress=False)


def load_weights(result) -> dict:
    return torch.load(result.run.dir / "model.pt", weights_only=True)


@contextlib.contextmanager
def open_fedavg(ws, data, config, shards=None):
    """A FedAvgRun between rounds, its run folder locked as during training."""
    run = ws.run(config.run_name(), config.to_dict())
    with run:
        shards = config.shards(data) if shards is None else shards
        yield fedavg.FedAvgRun(ws, data, config, run, shards=shards, eval_batch_size=256)


# ------------------------------------------------------------------ the FedSGD identity


def test_one_round_with_full_participation_and_full_batches_is_one_full_batch_gradient_step(
    workspace, small_data
):
    """C=1, J=1, B = shard size, no momentum, no weight decay, no augmentation: FedAvg == full-batch GD."""
    num_clients = 4  # 1,800 images: four shards of 450
    config = tiny_config(
        num_clients=num_clients,
        participation=1.0,
        local_steps=1,
        rounds=1,
        batch_size=450,
        momentum=0.0,
        weight_decay=0.0,
        augment=False,
        lr=0.5,
        seed=3,
    )
    result = run_fedavg(workspace, small_data, config, save_weights=True, progress=False)

    model = workspace.build_model("tiny_vit", 100, head_seed=3)
    model.train()
    inputs = normalize_resize(small_data.train.images, 32)
    loss = F.cross_entropy(model(inputs), small_data.train.labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    weights = load_weights(result)
    for (name, param), grad in zip(model.named_parameters(), grads):
        torch.testing.assert_close(weights[name], param.detach() - 0.5 * grad, rtol=0, atol=1e-5, msg=name)


# ------------------------------------------------------------------ the client update and aggregation


def test_the_server_averages_client_deltas_weighted_by_their_shard_sizes(workspace, small_data, monkeypatch):
    config = tiny_config()
    shards = np.split(np.arange(1800), np.cumsum([50, 100, 200, 300, 500]))  # six shards of unequal sizes
    generator = torch.Generator().manual_seed(0)
    deltas = []

    def hand_made_update(model, params, global_weights, batches, *, optimizer, precision, scaler_state):
        deltas.append(torch.randn(global_weights.shape, generator=generator))
        return fedavg.ClientUpdate(
            deltas[-1].clone(),
            samples=1,
            loss_sum=0.0,
            steps=1,
            skipped_steps=0,
            clipped_steps=0,
            scaler_state=scaler_state,
        )

    monkeypatch.setattr(fedavg, "client_update", hand_made_update)
    with open_fedavg(workspace, small_data, config, shards) as fed:
        start = fed.global_weights.clone()
        fed.round(0)
        clients = sample_clients(config.seed, 0, config.num_clients, config.participation)
        sizes = [len(fed.shards[c]) for c in clients]
    assert len(set(sizes)) > 1 and len(deltas) == len(clients) == 3
    expected = sum(n * d for n, d in zip(sizes, deltas)) / sum(sizes)
    torch.testing.assert_close(fed.global_weights - start, expected, rtol=1e-5, atol=1e-6)


def test_plain_fedavg_steps_by_the_average_delta():
    weights = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    average = torch.tensor([0.25, 2.0, -0.5], dtype=torch.float64)
    server_update(weights, average)  # eta_s = 1, no velocity: w + average
    assert torch.equal(weights, torch.tensor([1.25, 1.0, 0.0], dtype=torch.float64))


def test_server_learning_rate_scales_the_step():
    weights = torch.ones(2)
    server_update(weights, torch.tensor([1.0, -1.0]), None, server_lr=0.5, server_momentum=0.0)
    assert torch.equal(weights, torch.tensor([1.5, 0.5]))


def test_server_momentum_accumulates_like_fedavgm():
    weights, velocity = torch.zeros(1), torch.zeros(1)
    for delta in (1.0, 1.0, -1.0):
        server_update(weights, torch.tensor([delta]), velocity, server_lr=1.0, server_momentum=0.5)
    # v: 1, 1.5, -0.25; w: 1, 2.5, 2.25
    assert velocity.item() == pytest.approx(-0.25) and weights.item() == pytest.approx(2.25)


def test_local_steps_count_optimizer_steps_not_epochs(workspace, small_data, monkeypatch):
    # 20 clients of 90 images and B = 32: J = 4 steps see 128 images, more than one pass over a shard
    config = tiny_config(num_clients=20, participation=0.1, local_steps=4, batch_size=32)
    steps, counts = [], []
    real_update = fedavg.client_update

    def counted_update(*args, **kwargs):
        result = real_update(*args, **kwargs)
        counts.append(result.samples)
        return result

    monkeypatch.setattr(fedavg, "client_update", counted_update)
    with open_fedavg(workspace, small_data, config) as fed:
        real_optimizer = fed.new_optimizer

        def counted_optimizer(lr):
            optimizer = real_optimizer(lr)
            steps.append(0)
            optimizer.register_step_post_hook(lambda *_: steps.__setitem__(-1, steps[-1] + 1))
            return optimizer

        monkeypatch.setattr(fed, "new_optimizer", counted_optimizer)
        fed.round(0)
    assert steps == [4, 4] and counts == [128, 128]


def test_every_client_starts_from_the_global_weights_with_a_fresh_optimizer(
    workspace, small_data, monkeypatch
):
    """The second client's delta equals torch.optim.SGD from w_t: no momentum is carried between clients."""
    config = tiny_config(participation=0.34, local_steps=3, momentum=0.9, weight_decay=1e-3)  # 2 clients
    deltas = []
    real_update = fedavg.client_update

    def recording(*args, **kwargs):
        result = real_update(*args, **kwargs)
        deltas.append(result.delta.clone())
        return result

    monkeypatch.setattr(fedavg, "client_update", recording)
    with open_fedavg(workspace, small_data, config) as fed:
        start = fed.global_weights.clone()
        fed.round(0)
        client = int(sample_clients(config.seed, 0, config.num_clients, config.participation)[1])
        reference = workspace.build_model("tiny_vit", 100, head_seed=config.seed).train()
        named = dict(reference.named_parameters())
        params = [named[n] for n in fed.prepared.trainable_names]
        fedavg.load_flat(params, start)
        sgd = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        for inputs, labels in fed.client_batches(0, client):
            sgd.zero_grad()
            F.cross_entropy(reference(inputs), labels).backward()
            sgd.step()
    assert len(deltas) == 2
    torch.testing.assert_close(deltas[1], fedavg.read_flat(params) - start, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the fp16 loss scaler
# CPU runs are fp32, so these tests swap in an enabled CPU GradScaler. A scale near the float32
# maximum makes scaled gradients overflow, which is what fp16 does at 2^16: the step is skipped and
# the scale halves. An infinite scale overflows on every step, whatever the gradients.


def enabled_scaler(monkeypatch, init_scale: float, growth_interval: int = 1) -> None:
    monkeypatch.setattr(
        models,
        "grad_scaler",
        lambda device, precision: torch.amp.GradScaler(
            "cpu", init_scale=init_scale, growth_interval=growth_interval
        ),
    )


def record_client_updates(monkeypatch) -> list:
    """(round's scaler state passed in, client's result) for each client update, in call order."""
    calls, real_update = [], fedavg.client_update

    def recording(*args, **kwargs):
        result = real_update(*args, **kwargs)
        calls.append((dict(kwargs["scaler_state"]), result))
        return result

    monkeypatch.setattr(fedavg, "client_update", recording)
    return calls


def run_rounds(ws, data, config) -> tuple[list, torch.Tensor]:
    """The run's scaler state before and after each round, and the final global weights."""
    with open_fedavg(ws, data, config) as fed:
        states = [fed.scaler_state]
        for round_index in range(config.rounds):
            fed.round(round_index)
            states.append(fed.scaler_state)
        return states, fed.global_weights


def test_every_client_starts_from_the_runs_scale_and_the_run_keeps_the_smallest_end_scale(
    workspace, small_data, monkeypatch
):
    enabled_scaler(monkeypatch, init_scale=1.7e38)
    config = tiny_config(participation=0.34, local_steps=3, rounds=3, evaluate_test=False)  # 2 clients
    calls = record_client_updates(monkeypatch)
    states, _ = run_rounds(workspace, small_data, config)
    assert states[0]["scale"] == pytest.approx(1.7e38, rel=1e-6)
    for round_index in range(3):
        clients = calls[2 * round_index : 2 * round_index + 2]
        assert all(start == states[round_index] for start, _ in clients)
        ends = [result.scaler_state for _, result in clients]
        assert states[round_index + 1] == {
            **ends[0],
            "scale": min(e["scale"] for e in ends),
            "_growth_tracker": min(e["_growth_tracker"] for e in ends),
        }
    ends = [result.scaler_state["scale"] for _, result in calls]
    assert any(a != b for a, b in zip(ends[::2], ends[1::2])), "some round's clients end at different scales"
    assert len({s["scale"] for s in states}) > 2, "the scale carries over between rounds"


def test_client_order_does_not_change_a_round_under_loss_scaling(tmp_path, small_data, monkeypatch):
    """Clients are independent: in reversed order each client computes bit-identically, and so does the scale.

    (The aggregate's float sum depends on the order in its last bits, so w_{t+1} is compared to 1e-7.)
    """
    from fedta_utils.workspace import setup_workspace

    enabled_scaler(monkeypatch, init_scale=1.7e38)
    config = tiny_config(rounds=1, local_steps=3, evaluate_test=False)  # 3 clients
    calls = record_client_updates(monkeypatch)
    states, weights = run_rounds(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False), small_data, config
    )
    real_sample = fedavg.sample_clients
    monkeypatch.setattr(fedavg, "sample_clients", lambda *args: real_sample(*args)[::-1])
    reversed_states, reversed_weights = run_rounds(
        setup_workspace("smoke", tmp_path / "b", device="cpu", download=False), small_data, config
    )
    calls, reversed_calls = calls[:3], calls[3:][::-1]
    assert len(reversed_calls) == 3
    assert all(result.scaler_state != start for start, result in calls), (
        "the scale moves during each client's steps"
    )
    for (start, result), (reversed_start, reversed_result) in zip(calls, reversed_calls):
        assert start == reversed_start and result.scaler_state == reversed_result.scaler_state
        assert (result.samples, result.loss_sum, result.skipped_steps) == (
            reversed_result.samples,
            reversed_result.loss_sum,
            reversed_result.skipped_steps,
        )
        assert torch.equal(result.delta, reversed_result.delta)
    assert states == reversed_states
    torch.testing.assert_close(weights, reversed_weights, rtol=0, atol=1e-7)


def test_skipped_steps_are_logged_per_round(workspace, small_data, monkeypatch):
    enabled_scaler(monkeypatch, init_scale=1.7e38)
    calls = record_client_updates(monkeypatch)
    config = tiny_config(participation=0.34, local_steps=3, rounds=3, evaluate_test=False)  # 2 clients
    result = run_fedavg(workspace, small_data, config, progress=False)
    skips = [r.skipped_steps for _, r in calls]
    assert result.metrics["skipped_steps"].tolist() == [a + b for a, b in zip(skips[::2], skips[1::2])]
    assert sum(skips) > 0 and result.summary["skipped_steps"] == sum(skips)  # the run's total


def test_every_round_logs_the_share_of_its_steps_the_clip_scaled_down(workspace, small_data, monkeypatch):
    calls = record_client_updates(monkeypatch)
    # 2 clients of 3 steps; a clip of 1e-9 scales every step, no clip none
    clipped = tiny_config(
        participation=0.34, local_steps=3, rounds=2, finetune=FineTuneSpec(max_grad_norm=1e-9)
    )
    result = run_fedavg(workspace, small_data, clipped, progress=False)
    assert [(r.steps, r.clipped_steps) for _, r in calls] == [(3, 3)] * 4
    assert result.metrics["clip_fraction"].tolist() == [1.0, 1.0] and result.summary["clip_fraction"] == 1.0
    assert result.metrics["samples"].tolist() == [2 * 3 * 16] * 2
    assert result.summary["trained_images"] == 2 * 2 * 3 * 16
    plain = run_fedavg(workspace, small_data, replace(clipped, finetune=FineTuneSpec()), progress=False)
    assert plain.metrics["clip_fraction"].isna().all() and "clip_fraction" not in plain.summary  # no clip


def test_fp32_runs_log_no_skipped_steps(workspace, small_data):
    result = run_fedavg(workspace, small_data, tiny_config(rounds=2), progress=False)
    assert result.metrics["skipped_steps"].tolist() == [0, 0]


def test_a_skipped_step_still_uses_its_batch_and_counts_toward_j(workspace, small_data, monkeypatch):
    enabled_scaler(monkeypatch, init_scale=math.inf)  # every step overflows: J skipped steps per client
    config = tiny_config(num_clients=20, participation=0.1, local_steps=4, batch_size=32)  # 2 clients
    calls = record_client_updates(monkeypatch)
    with open_fedavg(workspace, small_data, config) as fed:
        start = fed.global_weights.clone()
        row = fed.round(0)
        assert torch.equal(fed.global_weights, start)
    assert [(r.samples, r.skipped_steps) for _, r in calls] == [
        (4 * 32, 4),
        (4 * 32, 4),
    ]  # J batches seen, J steps skipped
    assert all(torch.count_nonzero(r.delta) == 0 for _, r in calls)
    assert row["skipped_steps"] == 8


def test_a_run_interrupted_between_rounds_resumes_with_its_loss_scale(tmp_path, small_data, monkeypatch):
    from fedta_utils.workspace import setup_workspace

    enabled_scaler(monkeypatch, init_scale=1.7e38)
    config = tiny_config(participation=0.34, local_steps=3, rounds=3, evaluate_test=False)
    real_round, states = fedavg.FedAvgRun.round, []

    def recording_round(self, round_index):
        result = real_round(self, round_index)
        states.append(dict(self.scaler_state))
        return result

    monkeypatch.setattr(fedavg.FedAvgRun, "round", recording_round)
    reference = run_fedavg(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False),
        small_data,
        config,
        save_weights=True,
        progress=False,
    )
    assert states[1]["scale"] != pytest.approx(1.7e38), "the scale after round 2 is not the initial one"
    reference_states, states[:] = list(states), []
    ws = setup_workspace("smoke", tmp_path / "b", device="cpu", download=False)
    kill_in_round_three(monkeypatch, ws, small_data, config, recording_round)
    monkeypatch.setattr(fedavg.FedAvgRun, "round", recording_round)
    resumed = run_fedavg(ws, small_data, config, checkpoint_every=1, save_weights=True, progress=False)
    assert states == reference_states  # rounds 1-2, then round 3 resumed from the saved scale
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()
    weights, expected = load_weights(resumed), load_weights(reference)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


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
    quick = dict(rounds=2, seed=9, evaluate_test=False)
    short = run_fedavg(workspace, small_data, tiny_config(local_steps=1, **quick), progress=False)
    long = run_fedavg(workspace, small_data, tiny_config(local_steps=4, **quick), progress=False)
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
    positions = client_batch_indices(
        np.arange(5), local_steps=2, batch_size=32, seed=0, round_index=0, client=0
    )
    assert positions.shape == (2, 5)
    assert sorted(positions[0]) == list(range(5))


# ------------------------------------------------------------------ drift statistics (closed forms)


def stats_of(deltas) -> DeltaStats:
    stats = DeltaStats(len(deltas[0]), "cpu")
    for delta in deltas:
        stats.add(torch.tensor(delta))
    return stats


def summary_of(deltas) -> dict:
    return stats_of(deltas).summary(torch.tensor(deltas).mean(0))


def test_orthogonal_deltas_have_zero_mean_cosine():
    summary = summary_of([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    assert summary["mean_pairwise_cosine"] == pytest.approx(0.0, abs=1e-6)


def test_mean_pairwise_cosine_from_unit_sums_matches_the_pairwise_definition():
    deltas = [[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [3.0, 0.0, 1.0], [-1.0, -1.0, -1.0]]
    tensors = [torch.tensor(d, dtype=torch.float64) for d in deltas]
    pairs = [
        F.cosine_similarity(a, b, dim=0).item()
        for i, a in enumerate(tensors)
        for j, b in enumerate(tensors)
        if i != j
    ]
    assert summary_of(deltas)["mean_pairwise_cosine"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_identical_directions_have_cosine_one():
    summary = summary_of([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]])
    assert summary["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_single_client_has_no_pairwise_cosine():
    assert math.isnan(summary_of([[1.0, 2.0]])["mean_pairwise_cosine"])


def test_sign_conflict_fraction_counts_entries_moved_both_ways():
    # entry 0: up/up (agree); 1: up/down (conflict); 2: untouched (not counted); 3: down/0 (agree)
    summary = summary_of([[1.0, 1.0, 0.0, -1.0], [2.0, -3.0, 0.0, 0.0]])
    assert summary["sign_conflict_fraction"] == pytest.approx(1 / 3)


def test_sign_agreement_is_one_when_movers_agree_and_graded_otherwise():
    # entry 0: three up (1.0); entry 1: two up one down (1/3); entry 2: one up, others 0 (1.0); 3: untouched
    summary = summary_of([[1.0, 1.0, 0.5, 0.0], [2.0, 1.0, 0.0, 0.0], [0.1, -4.0, 0.0, 0.0]])
    assert summary["sign_agreement"] == pytest.approx((1.0 + 1 / 3 + 1.0) / 3)


def test_sign_agreement_of_random_signs_is_about_one_over_sqrt_m():
    generator = torch.Generator().manual_seed(0)
    stats = DeltaStats(20000, "cpu")
    for delta in torch.rand(10, 20000, generator=generator) - 0.5:
        stats.add(delta)
    # E|sum of 10 random signs| / 10 = (252/1024 * 10) / 10 ~ 0.246
    assert stats.summary(torch.zeros(20000))["sign_agreement"] == pytest.approx(0.246, abs=0.01)


def test_norms_of_client_deltas_and_of_the_average_delta():
    stats = stats_of([[3.0, 4.0], [0.0, 2.0]])
    summary = stats.summary(torch.tensor([0.75, 2.5]))  # (1 * d_1 + 3 * d_2) / 4
    assert summary["mean_client_delta_norm"] == pytest.approx((5.0 + 2.0) / 2)
    assert summary["avg_delta_norm"] == pytest.approx(math.hypot(0.75, 2.5))


# ------------------------------------------------------------------ metrics, evaluation, accounting


def test_evaluations_are_evenly_spaced_on_the_subsets_and_the_last_on_the_full_splits(
    workspace, small_data, monkeypatch
):
    from fedta_utils import training

    sizes, real_evaluate = [], training.evaluate
    monkeypatch.setattr(
        training,
        "evaluate",
        lambda model, image_set, *rest, **kwargs: (
            sizes.append(len(image_set)) or real_evaluate(model, image_set, *rest, **kwargs)
        ),
    )
    config = tiny_config(rounds=5, eval_points=3, eval_subset=100)
    result = run_fedavg(workspace, small_data, config, progress=False)
    evaluated = result.metrics.dropna(subset=["val_acc"])["round"].tolist()
    assert evaluated == [2, 4, 5]
    assert sizes == [100, 100, 100, 100, 200, 500]  # val and test subsets (1 per class), then the full splits
    assert {
        "test_acc",
        "test_loss",
        "val_loss",
        "mean_pairwise_cosine",
        "sign_agreement",
        "sign_conflict_fraction",
        "mean_client_delta_norm",
        "avg_delta_norm",
    } <= set(result.metrics)


def test_timing_has_train_eval_and_wall_seconds_per_round(workspace, small_data):
    result = run_fedavg(workspace, small_data, tiny_config(rounds=2, eval_points=1), progress=False)
    timing = pd.read_csv(result.run.dir / "timing.csv")
    assert timing.columns.tolist() == ["round", "train_s", "eval_s", "wall_s"]
    assert timing["eval_s"].iloc[0] == 0.0 and timing["eval_s"].iloc[1] > 0.0
    assert timing["wall_s"].iloc[-1] == pytest.approx((timing["train_s"] + timing["eval_s"]).sum())


def test_dense_rounds_send_every_trainable_entry_both_ways(workspace, small_data):
    result = run_fedavg(workspace, small_data, tiny_config(rounds=1), progress=False)
    model = workspace.build_model("tiny_vit", 100, head_seed=0)
    entries = sum(p.numel() for p in model.parameters())
    row = result.metrics.iloc[0]
    assert row["bytes_up"] == row["bytes_down"] == 3 * 4 * entries  # 3 clients, float32


def test_sparse_rounds_send_only_the_trainable_entries(workspace, small_data):
    spec = FineTuneSpec(head="ridge", mask_rule="random", sparsity=0.9, calibration_rounds=1)
    result = run_fedavg(workspace, small_data, tiny_config(rounds=1, finetune=spec), progress=False)
    trainable = result.summary["trainable_entries"]
    model = workspace.build_model("tiny_vit", 100, head_seed=0)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert trainable == round(0.1 * backbone)
    row = result.metrics.iloc[0]
    assert row["bytes_up"] == row["bytes_down"] == 3 * 4 * trainable


def test_frozen_entries_and_a_frozen_head_never_move_during_fedavg(workspace, small_data):
    spec = FineTuneSpec(
        head="ridge", mask_rule="least_sensitive", sparsity=0.8, calibration_rounds=2, calibration_samples=60
    )
    result = run_fedavg(
        workspace, small_data, tiny_config(rounds=2, finetune=spec), save_weights=True, progress=False
    )
    final = load_weights(result)
    masks = load_prepared(result.run.dir).masks
    prepared = torch.load(result.run.dir / "prepared.pt", weights_only=True)
    initial = workspace.build_model("tiny_vit", 100, head_seed=0).state_dict()
    assert torch.equal(final["head.weight"], prepared["head"]["weight"])
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], initial[name][~mask]), name
    moved = sum(int((final[n][m] != initial[n][m]).sum()) for n, m in masks.items())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())


def test_max_grad_norm_bounds_every_clients_update_under_the_frozen_head(workspace, small_data):
    """J=2 SGDM steps (momentum 0.9, no decay) with gradients clipped to c move a client by at most
    lr * (1 + 1.9) * c, so their weighted average does too; without the bound the round moves far more."""

    def round_change(max_grad_norm):
        spec = FineTuneSpec(head="ridge", max_grad_norm=max_grad_norm)
        config = tiny_config(rounds=1, weight_decay=0.0, finetune=spec, evaluate_test=False)
        final = load_weights(run_fedavg(workspace, small_data, config, save_weights=True, progress=False))
        initial = workspace.build_model("tiny_vit", 100, head_seed=0).state_dict()
        return float(
            torch.linalg.vector_norm(
                torch.cat(
                    [
                        (final[n].double() - initial[n].double()).flatten()
                        for n in initial
                        if not n.startswith("head.")
                    ]
                )
            )
        )

    bound = 0.05 * 2.9 * 1e-3
    assert round_change(1e-3) <= bound * (1 + 1e-3)
    assert round_change(None) > 10 * bound


def test_a_complete_run_is_read_back_not_recomputed(workspace, small_data, monkeypatch):
    first = run_fedavg(workspace, small_data, tiny_config(rounds=1), progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a complete run must not train again")

    monkeypatch.setattr(fedavg, "FedAvgRun", refuse)
    again = run_fedavg(workspace, small_data, tiny_config(rounds=1), progress=False)
    assert again.summary == first.summary
    pd.testing.assert_frame_equal(again.metrics, first.metrics)


def test_a_run_interrupted_between_rounds_resumes_to_bit_identical_results(tmp_path, small_data, monkeypatch):
    from fedta_utils.workspace import setup_workspace

    config = tiny_config(rounds=3, server_momentum=0.5, evaluate_test=False)  # the velocity is restored too
    reference = run_fedavg(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False),
        small_data,
        config,
        save_weights=True,
        progress=False,
    )
    ws = setup_workspace("smoke", tmp_path / "b", device="cpu", download=False)
    real_round = fedavg.FedAvgRun.round
    kill_in_round_three(monkeypatch, ws, small_data, config, real_round)
    rounds_run = []
    monkeypatch.setattr(
        fedavg.FedAvgRun, "round", lambda self, r: rounds_run.append(r) or real_round(self, r)
    )
    resumed = run_fedavg(ws, small_data, config, save_weights=True, progress=False)
    assert rounds_run == [2]  # from the checkpoint of round 2, not from scratch
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()
    weights, expected = load_weights(resumed), load_weights(reference)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_identical_configs_give_bit_identical_metrics(tmp_path, small_data):
    from fedta_utils.workspace import setup_workspace

    texts = []
    for name in ("a", "b"):
        ws = setup_workspace("smoke", tmp_path / name, device="cpu", download=False)
        result = run_fedavg(ws, small_data, tiny_config(rounds=2), progress=False)
        texts.append((result.run.dir / "metrics.csv").read_bytes())
    assert texts[0] == texts[1]


def test_non_iid_config_needs_classes_per_client():
    with pytest.raises(ConfigError, match="classes_per_client"):
        FedAvgConfig(**TINY, sharding="non_iid")


def test_config_identity_ignores_fields_that_do_not_apply():
    iid = tiny_config().to_dict()
    assert "classes_per_client" not in iid and "dirichlet_alpha" not in iid
    assert "sparsity" not in iid["finetune"] and "ridge_lambda" not in iid["finetune"]
