"""Specifications of the benchmark command (python -m fedta_utils.bench): its output, not its speed."""

from __future__ import annotations

import contextlib
import io
import math

import pandas as pd
import pytest
import torch

from fedta_utils import bench, models

METRIC_UNITS = {
    "train_step": "images/s",
    "fedavg_round": "images/s",
    "fedavg_over_bare_step": "ratio",
    "evaluation": "images/s",
    "data_path_share": "fraction of step",
    "fisher_loop": "samples/s",
    "fisher_hooks": "samples/s",
    "fisher_vmap": "samples/s",
    "fisher_hooks_speedup": "ratio",
    "fisher_vmap_speedup": "ratio",
    "sgd_step_ms": "ms",
    "sparse_sgdm_step_ms": "ms",
    "sparse_over_sgd_step": "ratio",
    "sgd_step_ms_forloop": "ms",
    "sparse_sgdm_step_ms_forloop": "ms",
    "sparse_over_sgd_step_forloop": "ratio",
}
SETUP_COLUMNS = ["device", "device_name", "precision", "model", "input_size", "batch_size", "attention",
                 "compile", "cpu_threads", "cpu_busy_before_pct", "load_average", "torch"]


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
    assert sorted(table["metric"]) == sorted(METRIC_UNITS)
    assert dict(zip(table["metric"], table["unit"])) == METRIC_UNITS


def test_every_figure_is_finite_and_positive(quick_run):
    _, table = quick_run
    for metric, value in zip(table["metric"], table["value"]):
        assert math.isfinite(value) and value > 0, f"{metric} = {value}"


def test_csv_states_how_the_figures_were_measured(quick_run):
    _, table = quick_run
    for column in SETUP_COLUMNS:
        assert column in table, f"missing setup column {column}"
        assert table[column].nunique(dropna=False) == 1, f"{column} differs between rows"
    row = table.iloc[0]
    assert (row["device"], row["precision"], row["model"]) == ("cpu", "fp32", "tiny_vit")
    assert (row["batch_size"], row["input_size"]) == (32, 32)


def test_printed_header_and_table_name_device_precision_model_and_batch(quick_run):
    printed, _ = quick_run
    header = printed.splitlines()[0]
    for text in ("device: cpu", "precision: fp32", "model: tiny_vit at 32x32", "batch: 32"):
        assert text in header
    for metric in METRIC_UNITS:
        assert metric in printed
    assert "written:" in printed


def test_manual_attention_switches_every_block_and_computes_the_same_function():
    model = models.build_model("tiny_vit", 10, pretrained=False).eval()
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(inputs)
        bench.set_attention(model, "manual")
        manual = model(inputs)
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)
    torch.testing.assert_close(manual, fused, rtol=1e-4, atol=1e-5)


def test_unknown_option_values_are_rejected():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.main(["--precision", "fp8"])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.main(["--attention", "flash"])
