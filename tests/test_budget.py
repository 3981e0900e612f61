"""Specifications of the cost estimate: python -m fedta_utils.pipeline --profile P --dry-run."""

from __future__ import annotations

import json
import math
import re

import pytest

from fedta_utils import bench, experiments, pipeline
from fedta_utils.workspace import discover_notebooks, profile_values


def notebook_code(key: str) -> str:
    cells = json.loads(discover_notebooks()[key].read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def notebook_params(key: str, profile: str) -> dict:
    """A notebook's parameters as papermill injects them: defaults, then the profile (lr not yet tuned)."""
    return {**pipeline.PLACEHOLDER_HPARAMS, **pipeline.notebook_values(discover_notebooks()[key], profile, {})}


def test_the_budget_builds_each_grid_with_the_functions_its_notebook_calls():
    for key in discover_notebooks():
        called = set(re.findall(r"experiments\.(\w+_configs)\(", notebook_code(key)))
        counted = {function for _, function in pipeline.NOTEBOOK_GRIDS.get(key, [])}
        assert counted == called, f"notebook {key}"


def test_notebooks_pass_their_whole_parameter_dict_to_each_grid():
    for key, groups in pipeline.NOTEBOOK_GRIDS.items():
        for _, function in groups:
            assert re.search(rf"experiments\.{function}\(\*\*(params|\{{\*\*params, \*\*best\}})\)",
                             notebook_code(key)), (key, function)


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_the_configs_are_the_ones_the_notebooks_build(profile):
    for group in pipeline.grids(profile):
        key = group["notebook"][:2]
        assert group["configs"] == getattr(experiments, group["function"])(**notebook_params(key, profile))


def test_overrides_change_the_counts_like_they_change_the_notebooks():
    one_seed = pipeline.grids("smoke", ["02"], {"seeds": [0]})
    assert [len(group["configs"]) for group in one_seed] == [1]
    assert pipeline.work_table(one_seed)["runs"].tolist() == [1]


def test_a_shared_step0_head_is_counted_once_where_it_is_first_fitted():
    groups = pipeline.grids("smoke", ["04"])
    table = pipeline.work_table(groups).set_index("group")
    params = groups[0]["params"]
    full = params["synthetic_train_size"]
    train, evaluated = full - round(full * params["val_fraction"]), round(full * params["val_fraction"]) + \
        params["synthetic_test_size"]
    seeds = len(profile_values("smoke")["seeds"])
    head_runs = 2 * seeds  # iid and one non-iid sharding
    assert table.loc["head only", "eval"] == head_runs * (evaluated + train)  # each fits its own head once
    sparse = [c for g in groups if g["group"] == "sparse FedAvg grid" for c in g["configs"]]
    sparse_eval = sum(pipeline.run_work(c, params)["eval"] for c in sparse)
    assert table.loc["sparse FedAvg grid", "eval"] == sparse_eval  # the heads come from the cache
    central = [c for g in groups if g["group"] == "centralized sparse" for c in g["configs"]]
    assert table.loc["centralized sparse", "eval"] == sum(pipeline.run_work(c, params)["eval"] for c in central) \
        + seeds * train  # a different (pooled) head per seed


def test_fedavg_work_counts_rounds_clients_steps_and_batches():
    config = pipeline.grids("full", ["02"])[0]["configs"][0]
    work = pipeline.run_work(config, {})
    assert work["train"] == config.rounds * 10 * config.local_steps * config.batch_size
    assert work["eval"] == -(-config.rounds // config.eval_every) * (5_000 + 10_000)


def test_smoke_dry_run_measures_this_machine_and_prints_per_notebook_and_total_hours(capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected_runs = sum(len(group["configs"]) for group in pipeline.grids("smoke"))
    total = re.search(r"total: (\d+) runs, ([\d,.]+) CPU-hours on this machine", out)
    assert total, out
    assert int(total.group(1)) == expected_runs
    assert 0 < float(total.group(2).replace(",", "")) < math.inf
    assert "model: tiny_vit at 32 px" in out and "precision: fp32" in out
    for key in pipeline.NOTEBOOK_GRIDS:
        assert discover_notebooks()[key].stem in out


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the device was calibrated although the input is bad")

    monkeypatch.setattr(bench, "unit_seconds", refuse)


@pytest.mark.parametrize("argv, message", [
    (["-p", "no_such_parameter", "1"], "-p no_such_parameter: no selected notebook declares"),
    (["--only", "09"], "--only ['09']: no such notebook"),
    (["-p", "seeds", "[-1]"], "seeds"),
    (["--only", "02", "-p", "rules", "['least_sensitive']"], "-p rules"),
])
def test_bad_input_is_rejected_by_name_before_calibrating(argv, message, no_calibration, capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run", *argv]) == 1
    assert message in capsys.readouterr().err
