"""Centralized fine-tuning, schedules and precision selection."""

import math

import pytest
import torch

from fedta_utils import precision
from fedta_utils.schedules import lr_multiplier, make_scheduler
from fedta_utils.sparse import FineTuneSpec
from fedta_utils.training import CentralizedConfig, run_centralized

TINY = dict(dataset="synthetic", model="tiny_vit", epochs=2, batch_size=64, lr=0.05)


def test_centralized_metrics_have_a_row_per_epoch_with_every_split(workspace, small_data):
    result = run_centralized(workspace, small_data, CentralizedConfig(**TINY), progress=False)
    metrics = result.metrics
    assert metrics["epoch"].tolist() == [1, 2]
    assert {"lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "wall_s"} <= set(metrics.columns)
    assert result.summary["final_test_acc"] == metrics["test_acc"].iloc[-1]


def test_hyperparameter_search_runs_never_touch_the_test_set(workspace, small_data):
    result = run_centralized(workspace, small_data, CentralizedConfig(**TINY, evaluate_test=False), progress=False)
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


def test_sparse_centralized_fine_tuning_moves_only_trainable_entries(workspace, small_data):
    from fedta_utils.sparse import load_run_masks

    spec = FineTuneSpec(head="ridge", mask_rule="least_sensitive", sparsity=0.9, calibration_rounds=2,
                        calibration_samples=64)
    result = run_centralized(workspace, small_data, CentralizedConfig(**TINY, finetune=spec), save_weights=True,
                             progress=False)
    final = torch.load(result.run.dir / "model.pt", weights_only=True)
    initial = workspace.build_model("tiny_vit", 100, head_seed=0).state_dict()
    for name, mask in load_run_masks(result.run.dir).items():
        assert torch.equal(final[name][~mask], initial[name][~mask]), name
    prepared = torch.load(result.run.dir / "prepared.pt", weights_only=True)
    assert torch.equal(final["head.weight"], prepared["head"]["weight"])
    assert result.summary["achieved_sparsity"] == pytest.approx(0.9, abs=1e-5)


def test_config_rejects_a_mismatched_dataset(workspace, small_data):
    from fedta_utils.checks import ConfigError

    with pytest.raises(ConfigError, match="config.dataset='cifar100'"):
        run_centralized(workspace, small_data, CentralizedConfig(model="tiny_vit"), progress=False)


# ------------------------------------------------------------------ schedules

def test_cosine_schedule_warms_up_linearly_then_anneals_to_zero():
    values = [lr_multiplier("cosine", step, 100, warmup_steps=10) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5, abs=0.02)
    assert values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    values = [lr_multiplier("step", step, 100) for step in (0, 49, 50, 74, 75, 99)]
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_constant_schedule_stays_at_the_base_rate_after_warm_up():
    assert [lr_multiplier("constant", s, 10, warmup_steps=2) for s in range(4)] == pytest.approx([0.5, 1, 1, 1])


def test_scheduler_checkpoint_resumes_the_same_rate():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", 20, 3)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = make_scheduler(optimizer2, "cosine", 20, 3)
    resumed.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step(), scheduler.step(), optimizer2.step(), resumed.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert math.isclose(scheduler.get_last_lr()[0], lr_multiplier("cosine", 8, 20, 3))


# ------------------------------------------------------------------ precision

def test_precision_is_fp32_on_a_cpu():
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert not precision.grad_scaler("cpu", "fp32").is_enabled()


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_follows_the_gpu_generation(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve_precision("auto", "cuda") == expected


def test_explicit_precision_is_kept_and_unknown_is_refused():
    from fedta_utils.checks import ConfigError

    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="precision='fp8'"):
        precision.resolve_precision("fp8", "cpu")


def test_fine_tuning_under_a_frozen_ridge_head_does_not_collapse(workspace, small_data):
    """A weakly regularised ridge head once made every frozen-head run diverge to chance (1 %)."""
    from fedta_utils.federated import FedAvgConfig, run_head_only

    head_only = run_head_only(workspace, small_data, FedAvgConfig(
        dataset="synthetic", model="tiny_vit", num_clients=1, participation=1.0, finetune=FineTuneSpec(head="ridge")),
        experiment="head_only")
    config = CentralizedConfig(**{**TINY, "epochs": 3, "lr": 0.1}, finetune=FineTuneSpec(head="ridge"))
    tuned = run_centralized(workspace, small_data, config, progress=False)
    assert head_only.summary["final_test_acc"] > 0.1
    assert tuned.metrics["test_acc"].iloc[-1] > 0.8 * head_only.summary["final_test_acc"]
    assert tuned.metrics["train_loss"].max() < 10
