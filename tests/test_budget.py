"""Specifications of the cost estimate: python -m fedta_utils.pipeline --profile P --dry-run."""

from __future__ import annotations

import json
import math
import re

import pytest

from fedta_utils import budget, experiments as ex, pipeline
from fedta_utils.profiles import profile_values

UNIT_SECONDS = {"train": 1e-3, "eval": 4e-4, "fisher": 1e-2}  # stand-ins: no calibration needed


def notebook_values(key: str, profile: str) -> dict:
    """A notebook's parameters as papermill would inject them: defaults, then the profile."""
    path = pipeline.discover_notebooks()[key]
    values = budget.notebook_defaults(path)
    values.update({k: v for k, v in profile_values(profile).items() if k in values})
    return values


def configs_as_the_notebooks_build_them(profile: str) -> dict[tuple[str, str], list]:
    """(notebook, group) -> configs, written as the notebooks' code cells write them (lr/wd not yet tuned)."""
    p = {key: notebook_values(key, profile) for key in ("01", "02", "03", "04", "05")}
    built = {}

    v = p["01"]
    settings = dict(dataset=v["dataset"], model=v["model"], seeds=v["seeds"], epochs=v["epochs"],
                    batch_size=v["batch_size"], momentum=v["momentum"], search_lrs=v["search_lrs"],
                    search_weight_decays=v["search_weight_decays"], search_epochs=v["search_epochs"],
                    schedulers=v["schedulers"], warmup_epochs=v["warmup_epochs"], precision=v["precision"])
    built["01_centralized", "lr search"] = ex.search_configs(**settings)
    built["01_centralized", "schedulers"] = ex.scheduler_configs(**settings, lr=0.01, weight_decay=0.0)

    def fedavg_settings(v):
        return dict(dataset=v["dataset"], model=v["model"], num_clients=v["num_clients"],
                    participation=v["participation"], batch_size=v["batch_size"], lr=0.01, weight_decay=0.0,
                    momentum=v["momentum"], lr_schedule=v["lr_schedule"], server_lr=v["server_lr"],
                    server_momentum=v["server_momentum"], eval_every=v["eval_every"], precision=v["precision"])

    v = p["02"]
    built["02_fedavg_iid", "FedAvg iid"] = ex.fedavg_iid_configs(
        seeds=v["seeds"], local_steps=v["local_steps"], rounds=v["rounds"], **fedavg_settings(v))
    v = p["03"]
    built["03_heterogeneity", "heterogeneity grid"] = ex.heterogeneity_configs(
        seeds=v["seeds"], classes_per_client_grid=v["classes_per_client_grid"],
        local_steps_grid=v["local_steps_grid"], base_rounds=v["base_rounds"], **fedavg_settings(v))

    def sparse_grid(v):
        settings = fedavg_settings(v)
        settings.update(head=v["head"], ridge_lambda=v["ridge_lambda"], probe_rounds=v["probe_rounds"],
                        calibration_samples=v["calibration_samples"], label_mode=v["label_mode"],
                        eligible=v["eligible"])
        return dict(settings, seeds=v["seeds"], local_steps=v["local_steps"], rounds=v["rounds"],
                    sparse_classes_per_client=v["sparse_classes_per_client"])

    v = p["04"]
    grid = sparse_grid(v)
    built["04_sparse_fl", "head only"] = ex.head_only_configs(**grid)
    built["04_sparse_fl", "sparse FedAvg grid"] = ex.sparse_fl_configs(
        sparsities=v["sparsities"], calibration_rounds_grid=v["calibration_rounds_grid"], **grid)
    built["04_sparse_fl", "centralized sparse"] = ex.sparse_central_configs(
        **grid, central_batch_size=v["central_batch_size"], sparse_central_epochs=v["sparse_central_epochs"],
        central_sparsity=v["central_sparsity"], central_calibration_rounds=v["central_calibration_rounds"])
    v = p["05"]
    built["05_mask_rules", "mask rules"] = ex.mask_rule_configs(
        rules=v["rules"], rule_sparsities=v["rule_sparsities"], rule_calibration_rounds=v["rule_calibration_rounds"],
        **sparse_grid(v))
    return built


def notebook_code(key: str) -> str:
    path = pipeline.discover_notebooks()[key]
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


# --------------------------------------------------------------------------- run counts

def test_the_budget_builds_each_grid_with_the_functions_its_notebook_calls():
    for key in pipeline.discover_notebooks():
        called = set(re.findall(r"experiments\.(\w+_configs)\(", notebook_code(key)))
        counted = {function for _, function in budget.NOTEBOOK_GRIDS.get(key, [])}
        assert counted == called, f"notebook {key}"


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_run_counts_equal_the_configs_the_notebooks_build(profile):
    plans = budget.build_plans(profile, None, {})
    counted = {(plan.notebook, plan.group): plan.work.runs for plan in plans if plan.configs}
    expected = {key: len(configs) for key, configs in configs_as_the_notebooks_build_them(profile).items()}
    assert counted == expected


def test_configs_are_the_notebooks_own_not_only_their_number():
    plans = {(plan.notebook, plan.group): plan.configs for plan in budget.build_plans("smoke", None, {})}
    for key, configs in configs_as_the_notebooks_build_them("smoke").items():
        assert plans[key] == configs, key


def test_overrides_change_the_counts_like_they_change_the_notebooks():
    one_seed = budget.build_plans("smoke", ["02"], {"seeds": [0]})
    assert [plan.work.runs for plan in one_seed] == [1]


def test_notebooks_without_training_are_listed_with_zero_runs():
    plans = budget.build_plans("smoke", ["00", "06"], {})
    assert [(plan.notebook[:2], plan.work.runs) for plan in plans] == [("00", 0), ("06", 0)]


def test_a_shared_step0_head_is_counted_once():
    plans = {plan.group: plan.work for plan in budget.build_plans("smoke", ["04"], {})}
    train, _, _ = budget.split_sizes(notebook_values("04", "smoke"))
    shardings, seeds = 2, len(profile_values("smoke")["seeds"])
    assert plans["head only"].feature_images == shardings * seeds * train  # fitted by the head-only runs
    assert plans["sparse FedAvg grid"].feature_images == 0                 # then read from the cache
    assert plans["centralized sparse"].feature_images == seeds * train     # a different (pooled) head


# --------------------------------------------------------------------------- hours

def test_hours_are_finite_and_positive_for_every_group_with_runs():
    table = budget.estimate(budget.build_plans("full", None, {}), UNIT_SECONDS)
    for _, row in table.iterrows():
        if row["runs"]:
            assert math.isfinite(row["hours"]) and row["hours"] > 0, row["group"]
            assert row["hours"] == pytest.approx(row["train_h"] + row["eval_h"] + row["fisher_h"])
        else:
            assert row["hours"] == 0
    totals = budget.per_notebook(table)
    assert totals["notebook"].iloc[-1] == "total"
    assert totals["runs"].iloc[-1] == table["runs"].sum()
    assert totals["hours"].iloc[-1] == pytest.approx(table["hours"].sum())


def test_smoke_dry_run_measures_this_machine_and_prints_per_notebook_and_total_hours(capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected_runs = sum(len(c) for c in configs_as_the_notebooks_build_them("smoke").values())
    total = re.search(r"total: (\d+) runs, ([\d,.]+) CPU-hours on this machine", out)
    assert total, out
    assert int(total.group(1)) == expected_runs
    assert 0 < float(total.group(2).replace(",", "")) < math.inf
    assert "model: tiny_vit at 32x32" in out and "precision: fp32" in out
    for stem in pipeline.discover_notebooks().values():
        assert stem.stem in out


# --------------------------------------------------------------------------- bad input, before any compute

@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the device was calibrated although the input is bad")

    monkeypatch.setattr(budget, "measure_unit_seconds", refuse)


@pytest.mark.parametrize("argv, message", [
    (["-p", "no_such_parameter", "1"], "-p no_such_parameter: no selected notebook declares"),
    (["--only", "09"], "--only ['09']: no such notebook"),
    (["-p", "seeds", "[-1]"], "seeds"),
    (["--only", "02", "-p", "rules", "['least_sensitive']"], "-p rules"),
])
def test_bad_input_is_rejected_by_name_before_calibrating(argv, message, no_calibration, capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run", *argv]) == 1
    assert message in capsys.readouterr().err
