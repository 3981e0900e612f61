"""Specifications of the benchmark command (python -m fedta_utils.bench): its output, not its speed."""

from __future__ import annotations

import contextlib
import io
import math

import pandas as pd
import pytest

from fedta_utils import bench, calibration, pipeline
from fedta_utils.checks import ConfigError
from fedta_utils.fedavg import FedAvgConfig
from fedta_utils.prepare import FineTuneSpec

METRIC_UNITS = {
    "train_step_b32": "images/s",
    "fedavg_round": "images/s",
    "fedavg_over_bare": "ratio",
    "evaluation": "images/s",
    "data_path_share": "fraction of step",
    "fisher_vmap": "samples/s",
    "fisher_loop": "samples/s",
    "sparse_over_sgd": "ratio",
    "check_frozen_exact_fp32": "1 = holds",
    "check_frozen_exact_bf16": "1 = holds",
    "check_all_ones_equals_sgd": "1 = holds",
    "check_fisher_equals_loop": "1 = holds",
}
SETUP_COLUMNS = ["device", "model", "precision", "torch", "setup"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The shortest benchmark, run once on the CPU: (printed text, CSV table)."""
    path = tmp_path_factory.mktemp("bench") / "bench.csv"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(["--quick", "--device", "cpu", "--csv", str(path)]) == 0
    return printed.getvalue(), pd.read_csv(path)


def test_csv_has_every_metric_once_with_its_unit(quick_run):
    _, table = quick_run
    assert dict(zip(table["metric"], table["unit"])) == METRIC_UNITS
    assert len(table) == len(METRIC_UNITS)


def test_every_figure_is_finite_and_positive(quick_run):
    _, table = quick_run
    for metric, value in zip(table["metric"], table["value"]):
        assert math.isfinite(value) and value > 0, f"{metric} = {value}"


def test_every_correctness_check_holds_on_the_cpu(quick_run):
    _, table = quick_run
    checks = table[table["metric"].str.startswith("check_")]
    assert len(checks) == 4 and (checks["value"] == 1).all(), checks


def test_csv_states_how_the_figures_were_measured(quick_run):
    _, table = quick_run
    for column in SETUP_COLUMNS:
        assert table[column].nunique(dropna=False) == 1, f"{column} differs between rows"
    row = table.iloc[0]
    assert (row["device"], row["precision"], row["model"]) == ("cpu", "fp32", "tiny_vit")


def test_printed_header_names_device_precision_and_model(quick_run):
    printed, _ = quick_run
    header = printed.splitlines()[0]
    for text in ("device: cpu", "precision: fp32", "model: tiny_vit at 32 px"):
        assert text in header
    for metric in METRIC_UNITS:
        assert metric in printed
    assert "written:" in printed


def test_unknown_option_values_are_rejected():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.main(["--precision", "fp8"])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.main(["--model", "resnet"])


@pytest.fixture(scope="module")
def gpu_check_on_cpu(tmp_path_factory):
    """--gpu-check on the CPU (tiny_vit, short steps): the table a lent GPU would produce."""
    path = tmp_path_factory.mktemp("gpu_check") / "gpu_check.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--quick", "--gpu-check", "--device", "cpu", "--csv", str(path)]) == 0
    return pd.read_csv(path).set_index("metric")


@pytest.mark.slow
def test_gpu_check_rehearses_every_code_path_and_resumes_equal(gpu_check_on_cpu):
    for kind in ("centralized", "fedavg", "sparse_fedavg"):
        row = gpu_check_on_cpu.loc[f"rehearsal_{kind}_resumed_equal"]
        assert row["value"] == 1 and "rehearsal" in row["note"]


@pytest.mark.slow
def test_gpu_check_holds_the_fedsgd_identity_and_reports_compile_and_calibration(gpu_check_on_cpu):
    assert gpu_check_on_cpu.loc["check_fedsgd_identity", "value"] == 1
    assert "compilation" in gpu_check_on_cpu.loc["train_step_b32_compiled", "note"]
    for kind in ("train", "eval", "fisher"):
        assert gpu_check_on_cpu.loc[f"dryrun_seconds_per_{kind}_32px", "value"] > 0


@pytest.mark.slow
def test_gpu_check_times_a_round_of_every_client_algorithm_and_merge_rule(gpu_check_on_cpu):
    rounds = gpu_check_on_cpu[gpu_check_on_cpu.index.str.startswith("round_")]
    labels = {"fedavg", "fedprox", "sparse_scaffold", "ties", "fisher_merge", "sparse_fedavg"}
    assert set(rounds.index) == {f"round_{label}" for label in labels}
    assert (rounds["unit"] == "s").all() and (rounds["value"] > 0).all(), rounds


@pytest.mark.slow
def test_gpu_check_times_real_checkpoints_whose_bytes_the_dry_run_counts(gpu_check_on_cpu):
    value = gpu_check_on_cpu["value"]
    for label, spec in (("fedavg", FineTuneSpec()), ("sparse_fedavg", bench.SPARSE)):
        assert value[f"checkpoint_{label}_write"] > 0 and value[f"checkpoint_{label}_read"] > 0
        estimate = pipeline.checkpoint_bytes(FedAvgConfig(model="tiny_vit", finetune=spec))
        assert value[f"checkpoint_{label}_bytes"] == pytest.approx(estimate, rel=0.02)
    assert 0 < value["checkpoint_sparse_fedavg_bytes"] < value["checkpoint_fedavg_bytes"] / 5


@pytest.mark.slow
def test_gpu_check_times_the_step_and_prices_the_study_at_both_sizes(gpu_check_on_cpu):
    value = gpu_check_on_cpu["value"]
    work = pipeline.work_table(pipeline.grids("full"))
    for size in (32, 16):  # tiny_vit's native size and the smaller one (160 px for ViT-S/16)
        assert value[f"train_step_b32_fp32_{size}px"] > 0
        unit = {kind: value[f"dryrun_seconds_per_{kind}_{size}px"] for kind in ("train", "eval", "fisher")}
        assert all(v > 0 for v in unit.values())
        hours = pipeline.work_seconds(work, unit).sum() / 3600
        assert value[f"dryrun_study_hours_{size}px"] == pytest.approx(hours) and hours > 0


def test_unit_seconds_measures_at_the_size_asked_and_says_so(monkeypatch):
    sizes, real = [], calibration.random_model

    def recorded(name, device, img_size=None):
        sizes.append(img_size)
        return real(name, device, img_size)

    monkeypatch.setattr(calibration, "random_model", recorded)
    monkeypatch.setattr(
        calibration, "best_time", lambda function, device, repeats: [function(), 1.0][1]
    )  # once
    unit, header = calibration.unit_seconds("tiny_vit", "fp32", 64, "cpu", img_size=16)
    assert sizes == [16, 16, 16]  # training step, evaluation, Fisher; timm refuses inputs of another size
    assert "model: tiny_vit at 16 px" in header
    assert set(unit) == {"train", "eval", "fisher"} and all(v > 0 for v in unit.values())


def test_unit_seconds_refuses_a_bad_size_before_building_anything(monkeypatch):
    monkeypatch.setattr(calibration, "random_model", lambda *args, **kwargs: pytest.fail("built a model"))
    with pytest.raises(ConfigError, match="img_size=150"):
        calibration.unit_seconds("dino_vits16", device="cpu", img_size=150)
