"""Centralized fine-tuning: metrics, determinism, resume, sparse masks, the frozen ridge head; schedules."""

import math

import pandas as pd
import pytest
import torch

from fedta_utils import training
from fedta_utils.optim import SparseSGDM
from fedta_utils.prepare import FineTuneSpec, load_prepared
from fedta_utils.training import CentralizedConfig, run_centralized

TINY = dict(dataset="synthetic", model="tiny_vit", epochs=2, batch_size=64, lr=0.05, eval_points=2)


class Killed(Exception):
    """Stands for a process killed mid-run."""


def test_centralized_metrics_have_a_row_per_epoch_with_every_split(workspace, small_data):
    result = run_centralized(workspace, small_data, CentralizedConfig(**TINY), progress=False)
    metrics = result.metrics
    assert metrics["epoch"].tolist() == [1, 2]
    assert {"lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "wall_s"} <= set(
        metrics.columns
    )
    assert result.summary["final_test_acc"] == metrics["test_acc"].iloc[-1]
    # every row logs the images trained on, the fp16 skips and the clipped share of its steps
    train_images = len(small_data.train)
    assert metrics["samples"].tolist() == [train_images] * 2 and metrics["skipped_steps"].tolist() == [0, 0]
    assert metrics["clip_fraction"].isna().all()  # a run without a clip: no share, not 0
    assert "clip_fraction" not in result.summary
    assert result.summary["trained_images"] == 2 * train_images
    timing = pd.read_csv(result.run.dir / "timing.csv")
    assert timing.columns.tolist() == ["epoch", "train_s", "eval_s", "wall_s"]


def test_a_centralized_run_logs_the_share_of_its_steps_the_clip_scaled_down(workspace, small_data):
    config = CentralizedConfig(**TINY, finetune=FineTuneSpec(max_grad_norm=1e-9))  # every step clipped
    result = run_centralized(workspace, small_data, config, progress=False)
    assert result.metrics["clip_fraction"].tolist() == [1.0, 1.0] and result.summary["clip_fraction"] == 1.0


def test_hyperparameter_search_runs_never_touch_the_test_set(workspace, small_data):
    config = CentralizedConfig(**TINY, evaluate_test=False)
    result = run_centralized(workspace, small_data, config, progress=False)
    assert not any(column.startswith("test_") for column in result.metrics.columns)


def test_training_learns_the_synthetic_task(workspace, small_data):
    config = CentralizedConfig(**{**TINY, "epochs": 4, "lr": 0.1})
    result = run_centralized(workspace, small_data, config, progress=False)
    assert result.metrics["test_acc"].iloc[-1] > 0.05  # chance is 0.01
    assert result.metrics["train_loss"].iloc[-1] < result.metrics["train_loss"].iloc[0]


def test_identical_centralized_runs_write_identical_metrics(tmp_path, small_data):
    from fedta_utils.workspace import setup_workspace

    texts = []
    for name in ("a", "b"):
        ws = setup_workspace("smoke", tmp_path / name, device="cpu", download=False)
        result = run_centralized(ws, small_data, CentralizedConfig(**TINY), progress=False)
        texts.append((result.run.dir / "metrics.csv").read_bytes())
    assert texts[0] == texts[1]


def test_a_run_interrupted_after_an_epoch_resumes_to_bit_identical_results(tmp_path, monkeypatch):
    from fedta_utils.data import prepare_data
    from fedta_utils.workspace import setup_workspace

    small_data = prepare_data("synthetic", synthetic_train_size=1000, synthetic_test_size=100)  # 900 to train
    config = CentralizedConfig(**TINY, warmup_epochs=0.5)  # the scheduler state is restored too
    reference = run_centralized(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False),
        small_data,
        config,
        save_weights=True,
        progress=False,
    )
    ws = setup_workspace("smoke", tmp_path / "b", device="cpu", download=False)
    real_evaluate, calls = training.evaluate_splits, []

    def evaluate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("during the second epoch's evaluation")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_splits", evaluate_then_die)
    with pytest.raises(Killed):
        run_centralized(ws, small_data, config, checkpoint_every=1, save_weights=True, progress=False)
    calls.clear()
    monkeypatch.setattr(
        training, "evaluate_splits", lambda *args, **kwargs: calls.append(1) or real_evaluate(*args, **kwargs)
    )
    resumed = run_centralized(ws, small_data, config, checkpoint_every=1, save_weights=True, progress=False)
    assert len(calls) == 1  # epoch 2 only: epoch 1 comes from its checkpoint
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()
    weights, expected = (torch.load(r.run.dir / "model.pt", weights_only=True) for r in (resumed, reference))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_sparse_centralized_fine_tuning_moves_only_trainable_entries(workspace, small_data):
    spec = FineTuneSpec(
        head="ridge", mask_rule="least_sensitive", sparsity=0.9, calibration_rounds=2, calibration_samples=64
    )
    result = run_centralized(
        workspace, small_data, CentralizedConfig(**TINY, finetune=spec), save_weights=True, progress=False
    )
    final = torch.load(result.run.dir / "model.pt", weights_only=True)
    initial = workspace.build_model("tiny_vit", 100, head_seed=0).state_dict()
    for name, mask in load_prepared(result.run.dir).masks.items():
        assert torch.equal(final[name][~mask], initial[name][~mask]), name
    prepared = torch.load(result.run.dir / "prepared.pt", weights_only=True)
    assert torch.equal(final["head.weight"], prepared["head"]["weight"])
    assert result.summary["achieved_sparsity"] == pytest.approx(0.9, abs=1e-5)


def test_config_rejects_a_mismatched_dataset(workspace, small_data):
    from fedta_utils.checks import ConfigError

    with pytest.raises(ConfigError, match="config.dataset='cifar100'"):
        run_centralized(workspace, small_data, CentralizedConfig(model="tiny_vit"), progress=False)


# ------------------------------------------------------------------ schedules


def test_fine_tuning_under_a_frozen_ridge_head_does_not_collapse(workspace, small_data):
    """A weakly regularised ridge head once made every frozen-head run diverge to chance (1 %)."""
    from fedta_utils.experiments import run_head_only
    from fedta_utils.fedavg import FedAvgConfig

    head_only = run_head_only(
        workspace,
        small_data,
        FedAvgConfig(
            dataset="synthetic",
            model="tiny_vit",
            num_clients=1,
            participation=1.0,
            finetune=FineTuneSpec(head="ridge"),
        ),
    )
    config = CentralizedConfig(**{**TINY, "epochs": 3, "lr": 0.1}, finetune=FineTuneSpec(head="ridge"))
    tuned = run_centralized(workspace, small_data, config, progress=False)
    assert head_only.summary["final_test_acc"] > 0.1
    assert tuned.metrics["test_acc"].iloc[-1] > 0.8 * head_only.summary["final_test_acc"]
    assert tuned.metrics["train_loss"].max() < 10


def test_centralized_training_clips_to_the_specs_max_grad_norm(workspace, small_data):
    """T SGDM steps (momentum 0.9, rate multiplier <= 1, no decay) with gradients clipped to c move the
    backbone by at most lr * 10 * T * c; without the bound it moves far more."""
    steps = math.ceil(1800 / 64)  # one epoch

    def change(max_grad_norm):
        config = CentralizedConfig(
            **{**TINY, "epochs": 1},
            weight_decay=0.0,
            evaluate_test=False,
            finetune=FineTuneSpec(head="ridge", max_grad_norm=max_grad_norm),
        )
        final = torch.load(
            run_centralized(workspace, small_data, config, save_weights=True, progress=False).run.dir
            / "model.pt",
            weights_only=True,
        )
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

    bound = 0.05 * 10 * steps * 1e-5
    assert change(1e-5) <= bound
    assert change(None) > 10 * bound


def test_eval_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert training.eval_steps(200, 10) == list(range(20, 201, 20))
    assert training.eval_steps(50, 10) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert training.eval_steps(7, 3) == [3, 5, 7]
    assert training.eval_steps(3, 10) == [1, 2, 3]  # never more points than steps


def test_evaluations_fall_mid_epoch_on_the_subsets_and_the_last_on_the_full_splits(
    workspace, small_data, monkeypatch
):
    sizes, real_evaluate = [], training.evaluate
    monkeypatch.setattr(
        training,
        "evaluate",
        lambda model, image_set, *rest, **kwargs: (
            sizes.append(len(image_set)) or real_evaluate(model, image_set, *rest, **kwargs)
        ),
    )
    config = CentralizedConfig(**{**TINY, "eval_points": 5, "eval_subset": 100})
    metrics = run_centralized(workspace, small_data, config, progress=False).metrics
    steps = training.eval_steps(2 * 29, 5)  # 1,800 images / 64 = 29 steps per epoch
    assert metrics["epoch"].tolist() == pytest.approx([s / 29 for s in steps])
    assert sizes == [100, 100] * 4 + [200, 500]  # val and test subsets (1 per class), then the full splits
    assert metrics["wall_s"].notna().all() and metrics["wall_s"].is_monotonic_increasing


def test_a_run_killed_between_mid_epoch_evaluations_resumes_bit_identical(tmp_path, monkeypatch):
    from fedta_utils.data import prepare_data
    from fedta_utils.workspace import setup_workspace

    data = prepare_data("synthetic", synthetic_train_size=1000, synthetic_test_size=100)
    config = CentralizedConfig(**{**TINY, "eval_points": 3})  # 15 steps per epoch: evaluations at 10, 20, 30
    reference = run_centralized(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False), data, config, progress=False
    )
    ws = setup_workspace("smoke", tmp_path / "b", device="cpu", download=False)
    real_evaluate, calls = training.evaluate_splits, []

    def evaluate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's second evaluation: its train loss carries from epoch 1's last steps
            raise Killed("mid-run")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_splits", evaluate_then_die)
    with pytest.raises(Killed):
        run_centralized(ws, data, config, progress=False)
    monkeypatch.setattr(training, "evaluate_splits", real_evaluate)
    resumed = run_centralized(ws, data, config, progress=False)
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()


def test_train_steps_counts_the_steps_the_loss_scaler_skips_and_each_still_uses_its_batch():
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    batch = (torch.tensor([[1000.0, 0.0]] * 4), torch.zeros(4, dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # zero weights: the gradient is [[-500, 0], [500, 0]], so scales of 2^125..2^127 overflow float32
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    done = training.train_steps(model, optimizer, scaler, [batch] * 3, precision="fp32")
    assert (done.samples, done.steps, done.skipped) == (12, 3, 3) and scaler.get_scale() == 2.0**124
    assert done.loss_sum.item() == pytest.approx(12 * math.log(2), abs=1e-5)  # every batch was used
    assert torch.equal(model.weight, torch.zeros(2, 2))
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    done = training.train_steps(model, optimizer, disabled, [batch] * 3, precision="fp32")
    assert (done.samples, done.skipped) == (12, 0) and model.weight.abs().sum() > 0


def test_train_steps_counts_the_steps_whose_gradient_the_clip_scaled_down():
    """SparseSGDM.clipped_steps: a step counts when the trainable gradient's norm exceeds max_grad_norm."""
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    big = (torch.tensor([[100.0, 0.0]] * 4), torch.zeros(4, dtype=torch.long))  # gradient norm 50 * sqrt(2)
    small = (torch.tensor([[0.01, 0.0]] * 4), torch.zeros(4, dtype=torch.long))  # norm about 0.007
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = SparseSGDM(model.parameters(), lr=0.0, max_grad_norm=1.0)  # lr 0: the gradients stay the same
    done = training.train_steps(model, optimizer, scaler, [big, small, big], precision="fp32")
    assert (done.steps, int(done.clipped)) == (3, 2)
    done = training.train_steps(model, optimizer, scaler, [small], precision="fp32")
    assert int(done.clipped) == 0 and int(optimizer.clipped_steps) == 2  # per call: the count since its start
    unclipped = torch.optim.SGD(model.parameters(), lr=0.0)
    assert training.train_steps(model, unclipped, scaler, [big], precision="fp32").clipped is None
    no_clip = SparseSGDM(model.parameters(), lr=0.0)
    assert training.train_steps(model, no_clip, scaler, [big], precision="fp32").clipped is None


@pytest.mark.parametrize("full_val_curve", [False, True])
def test_full_val_curve_evaluates_the_whole_validation_split_at_every_point(
    workspace, small_data, monkeypatch, full_val_curve
):
    """Before the last point: the validation split whole with full_val_curve (else its subset), test on
    its subset; at the last point both whole."""
    sizes = []
    real_evaluate = training.evaluate

    def measured(model, image_set, *args, **kwargs):
        sizes.append(len(image_set))
        return real_evaluate(model, image_set, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate", measured)
    config = CentralizedConfig(**{**TINY, "eval_subset": 100, "full_val_curve": full_val_curve})
    run_centralized(workspace, small_data, config, progress=False)
    val, test = len(small_data.val), len(small_data.test)
    val_subset = len(small_data.eval_subset("val", 100))
    test_subset = len(small_data.eval_subset("test", 100))
    assert val_subset < val and test_subset < test
    first_val = val if full_val_curve else val_subset
    assert sizes == [first_val, test_subset, val, test]
    assert ("full_val_curve" in config.to_dict()) == full_val_curve  # a run without it keeps its identity
