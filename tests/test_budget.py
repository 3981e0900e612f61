"""Specifications of the cost estimate: python -m fedta_utils.pipeline --profile P --dry-run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from fedta_utils import calibration, experiments, pipeline, team, training
from fedta_utils.workspace import discover_notebooks, profile_values


def notebook_code(key: str) -> str:
    cells = json.loads(discover_notebooks()[key].read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def notebook_params(key: str, profile: str) -> dict:
    """A notebook's parameters as papermill injects them: defaults, then the profile (lr not yet tuned)."""
    return experiments.with_stand_ins(pipeline.notebook_values(discover_notebooks()[key], profile, {}))


def test_the_budget_counts_the_grids_each_notebook_runs_in_their_order():
    for key in discover_notebooks():
        constants = re.findall(
            r"experiments\.run\(ws, data, experiments\.(\w+), params\)", notebook_code(key)
        )
        run = [getattr(experiments, constant) for constant in constants]
        counted = experiments.NOTEBOOK_EXPERIMENTS.get(key, [])
        assert run == counted, f"notebook {key}"


def test_notebooks_pass_their_whole_parameter_dict_to_each_grid():
    for key in discover_notebooks():
        calls = re.findall(r"experiments\.run\((.*)\)", notebook_code(key))
        assert all(call.endswith(", params") for call in calls), key


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_the_configs_are_the_ones_the_notebooks_build(profile):
    for group in pipeline.grids(profile):
        key = group["notebook"][:2]
        assert group["configs"] == group["function"](**notebook_params(key, profile))


def test_overrides_change_the_counts_like_they_change_the_notebooks():
    one_seed = pipeline.grids("smoke", ["02"], {"seeds": [0]})
    assert [len(group["configs"]) for group in one_seed] == [2, 1]  # the lr search has no seeds
    assert pipeline.work_table(one_seed)["runs"].tolist() == [2, 1]


def test_a_shared_step0_head_is_counted_once_where_it_is_first_fitted():
    groups = pipeline.grids("smoke", ["04"])
    table = pipeline.work_table(groups).set_index("group")
    params = groups[0]["params"]
    full = params["synthetic_train_size"]
    val = round(full * params["val_fraction"])
    train, evaluated = full - val, val + params["synthetic_test_size"]
    seeds = len(profile_values("smoke")["seeds"])
    head_runs = 2 * seeds  # iid and one non-iid sharding
    # each fits its own head once (train features, then validation features to choose the penalty)
    assert table.loc["head only", "eval"] == head_runs * (evaluated + train + val)
    sparse = [c for g in groups if g["group"] == "sparse FedAvg grid" for c in g["configs"]]
    sparse_eval = sum(pipeline.run_work(c, params)["eval"] for c in sparse)
    assert table.loc["sparse FedAvg grid", "eval"] == sparse_eval  # the heads come from the cache
    # a different (pooled) head per seed: its lr search fits seed 0's, the baseline the others
    search = [c for g in groups if g["group"] == "centralized lr search" for c in g["configs"]]
    assert {c.seed for c in search} == {0}
    assert table.loc["centralized lr search", "eval"] == sum(
        pipeline.run_work(c, params)["eval"] for c in search
    ) + (train + val)
    central = [c for g in groups if g["group"] == "centralized sparse" for c in g["configs"]]
    assert table.loc["centralized sparse", "eval"] == sum(
        pipeline.run_work(c, params)["eval"] for c in central
    ) + (seeds - 1) * (train + val)


def test_the_full_study_fits_its_budget_of_trained_and_evaluated_images():
    table = pipeline.work_table(pipeline.grids("full"))
    per_notebook = table.groupby("notebook")[["train", "eval"]].sum()
    budgets = {
        "01_centralized": 4.1e6,  # the lr x weight-decay search runs under each of the 3 schedulers
        "02_fedavg_iid": 1.5e6,
        "03_heterogeneity": 11.5e6,
        "04_sparse_fl": 6.0e6,
        "05_mask_rules": 3.0e6,
        "06_remedies": 4.0e6,  # its searches included
    }
    for notebook, budget in budgets.items():
        assert per_notebook.loc[notebook, "train"] <= budget, notebook
    assert table["train"].sum() <= 27e6
    assert table["eval"].sum() <= 0.3 * table["train"].sum()


def test_notebook_03_shares_its_iid_runs_at_the_first_j_with_notebook_02():
    groups = pipeline.grids("full", ["02", "03"])
    runs = pipeline.work_table(groups).set_index("group")["runs"]
    grid = next(g for g in groups if g["experiment"] == experiments.HETEROGENEITY)
    iid = next(g for g in groups if g["experiment"] == experiments.FEDAVG_IID)["configs"]
    shared = [c for c in grid["configs"] if c in iid]
    assert (
        len(shared) == 3
        and {c.local_steps for c in shared} == {4}
        and {c.sharding for c in shared} == {"iid"}
    )
    assert runs["heterogeneity grid"] == len(grid["configs"]) - 3  # counted once, in notebook 02
    alone = pipeline.work_table(pipeline.grids("full", ["03"])).set_index("group")["runs"]
    assert alone["heterogeneity grid"] == len(grid["configs"])  # without 02 selected, 03 trains them


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_notebook_05s_least_sensitive_runs_are_notebook_04s_default_runs_counted_once(profile):
    groups = pipeline.grids(profile, ["04", "05"])
    sparse = next(g for g in groups if g["experiment"] == experiments.SPARSE_FL)["configs"]
    rules = next(g for g in groups if g["experiment"] == experiments.MASK_RULES)["configs"]
    shared = [c for c in rules if c in sparse]
    seeds = len(notebook_params("05", profile)["seeds"])
    assert len(shared) == 2 * seeds  # iid and Nc, every seed
    assert {c.finetune.mask_rule for c in shared} == {"least_sensitive"}
    runs = pipeline.work_table(groups).set_index("group")["runs"]
    assert runs["mask rules"] == len(rules) - len(shared)


def test_every_full_run_evaluates_at_least_ten_times():
    for group in pipeline.grids("full"):
        for config in group["configs"] if group["function"] is not experiments.head_only_configs else []:
            steps = getattr(config, "rounds", None) or config.epochs * -(-45_000 // config.batch_size)
            assert len(training.eval_steps(steps, config.eval_points)) >= 10, (group["group"], config)


def test_fedavg_work_counts_rounds_clients_steps_and_batches():
    config = pipeline.grids("full", ["02"])[1]["configs"][0]  # [0] is the lr search
    work = pipeline.run_work(config, {})
    assert work["train"] == config.rounds * 10 * config.local_steps * config.batch_size
    assert config.eval_points == 10 and config.eval_subset == 1000
    # the full validation split and the test subset, then the full splits at the end (full_val_curve)
    assert config.full_val_curve and work["eval"] == 9 * (5_000 + 1_000) + (5_000 + 10_000)


def test_smoke_dry_run_measures_this_machine_and_prints_per_notebook_and_total_hours(capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected_runs = pipeline.work_table(pipeline.grids("smoke"))["runs"].sum()
    total = re.search(r"total: (\d+) runs, ([\d,.]+) CPU-hours on this machine", out)
    assert total, out
    assert int(total.group(1)) == expected_runs
    assert 0 < float(total.group(2).replace(",", "")) < math.inf
    assert "model: tiny_vit at 32 px" in out and "precision: fp32" in out
    assert re.search(r"written to the results folder: [\d.]+ GB, of which checkpoints [\d.]+ GB", out)
    for key in experiments.NOTEBOOK_EXPERIMENTS:
        assert discover_notebooks()[key].stem in out


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the device was calibrated although the input is bad")

    monkeypatch.setattr(calibration, "unit_seconds", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-p", "no_such_parameter", "1"], "-p no_such_parameter: no selected notebook declares"),
        (["--only", "09"], "--only ['09']: no such notebook"),
        (["-p", "seeds", "[-1]"], "seeds"),
        (["--only", "02", "-p", "rules", "['least_sensitive']"], "-p rules"),
    ],
)
def test_bad_input_is_rejected_by_name_before_calibrating(argv, message, no_calibration, capsys):
    assert pipeline.main(["--profile", "smoke", "--dry-run", *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_notebook_04s_lr_search_is_the_grids_default_run_at_each_lr(profile):
    from dataclasses import replace

    params = {**notebook_params("04", profile), "lr": 0.05, "sparse_lr": 0.002}  # two distinct lrs
    search = experiments.sparse_search_configs(**params)
    grid = experiments.sparse_fl_configs(**params)
    default = [
        c
        for c in grid
        if c.sharding == "iid"
        and c.seed == params["seeds"][0]
        and c.finetune.mask_rule
        and (c.finetune.sparsity, c.finetune.calibration_rounds)
        == (params["sparsity"], params["calibration_rounds"])
    ]
    assert len(default) == 1 and [c.lr for c in search] == params["sparse_search_lrs"]
    for config in search:
        assert config == replace(
            default[0], lr=config.lr, rounds=params["sparse_search_rounds"], evaluate_test=False
        )
    under_head = [c for c in grid if c.finetune.head == "ridge"]
    assert under_head and {c.lr for c in under_head} == {params["sparse_lr"]}  # plain FedAvg keeps 02's lr
    assert {c.lr for c in grid if c.finetune.head == "train"} == {params["lr"]}


def test_the_sweeps_always_hold_the_default_setting():
    settings = experiments.sparse_settings([0.5, 0.7], [1, 2], 0.9, 4)
    assert settings == [(0.5, 4), (0.7, 4), (0.9, 1), (0.9, 2), (0.9, 4)]
    assert experiments.sparse_settings([0.5, 0.9], [1, 4], 0.9, 4) == [(0.5, 4), (0.9, 4), (0.9, 1)]


def test_a_scaffold_checkpoint_counts_its_control_variates():
    from dataclasses import replace

    from fedta_utils.fedavg import FedAvgConfig

    plain = FedAvgConfig(dataset="synthetic", model="tiny_vit", img_size=32, num_clients=10, momentum=0.0)
    scaffold = replace(plain, algorithm="scaffold")
    counts = pipeline.entry_counts("tiny_vit", 32, "backbone")
    moving = counts["all"]  # a dense run with a trained head moves every entry
    assert pipeline.checkpoint_bytes(scaffold) - pipeline.checkpoint_bytes(plain) == 4 * moving * (1 + 10)


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_notebook_06_reads_back_04s_fedavg_and_sparse_runs_and_counts_them_once(profile):
    groups = pipeline.grids(profile, ["04", "06"])
    sparse_grid = next(g for g in groups if g["experiment"] == experiments.SPARSE_FL)["configs"]
    remedies = next(g for g in groups if g["experiment"] == experiments.REMEDIES)["configs"]
    shared = [c for c in remedies if c in sparse_grid]
    seeds = len(notebook_params("06", profile)["seeds"])
    assert len(shared) == 2 * 2 * seeds  # FedAvg and sparse FedAvg, on iid and Nc=5, every seed
    assert {(c.sharding, c.classes_per_client) for c in shared} == {("iid", None), ("non_iid", 5)}
    runs = pipeline.work_table(groups).set_index("group")["runs"]
    assert runs["remedies"] == len(remedies) - len(shared)


def test_the_fisher_merge_counts_each_clients_fisher_samples_every_round():
    config = next(c for g in pipeline.grids("full", ["06"]) for c in g["configs"] if c.merge_rule == "fisher")
    work = team.run_work(config, {})
    assert work["fisher"] == config.rounds * config.clients_per_round * config.merge_fisher_samples
    assert team.run_work(replace(config, merge_rule="mean"), {})["fisher"] == 0
