"""Specifications of the run store and the recorded grids: tables read the grid that ran, a configuration
two grids name is trained once, identities hold the resolved precision, searches record what they chose
and what was used, checkpoints follow the clock and the dry-run knows their size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedta_utils import experiments, pipeline, results, runs
from fedta_utils.checks import ConfigError
from fedta_utils.experiments import run_grid, run_head_only
from fedta_utils.fedavg import FedAvgConfig, run_fedavg
from fedta_utils.optim import SCHEDULERS
from fedta_utils.prepare import FineTuneSpec
from fedta_utils.training import CentralizedConfig, RunResult, run_centralized
from fedta_utils.workspace import check_central_schedule, discover_notebooks, read_chosen, setup_workspace

FL = dict(
    dataset="synthetic",
    model="tiny_vit",
    img_size=32,
    num_clients=10,
    participation=0.2,
    local_steps=1,
    batch_size=16,
    rounds=2,
    eval_points=1,
    eval_subset=100,
)
SPARSE = FineTuneSpec(
    head="ridge",
    mask_rule="least_sensitive",
    sparsity=0.9,
    calibration_rounds=1,
    calibration_samples=40,
    max_grad_norm=1.0,
)
PARAMS = {"eval_batch_size": 128}


@pytest.fixture(scope="module")
def tiny_data():
    """600 synthetic training images (540 / 60 after the split) and 100 test images, 100 classes."""
    from fedta_utils.data import prepare_data

    return prepare_data("synthetic", synthetic_train_size=600, synthetic_test_size=100)


def attempts(run_dir) -> int:
    return len((run_dir / "attempts.log").read_text().splitlines())


# --------------------------------------------------------------------------- tables from the grid that ran


def test_two_executions_at_different_lrs_give_tables_of_the_second_grid_only(workspace, tiny_data, capsys):
    for lr in (0.05, 0.01):  # notebook 02 run twice into one results folder, with -p lr 0.05, then 0.01
        params = {
            **FL,
            "client_batch_size": FL["batch_size"],
            "seeds": [0, 1],
            "lr": lr,
            "weight_decay": 0.0,
            "momentum": 0.9,
            "lr_schedule": "constant",
            "server_lr": 1.0,
            "server_momentum": 0.0,
            "precision": "auto",
            **PARAMS,
        }
        configs = experiments.fedavg_iid_configs(**params)
        run_grid(
            run_fedavg,
            workspace,
            tiny_data,
            experiments.FEDAVG_IID,
            configs=configs,
            params=params,
            wait=False,
        )
    assert (
        "2 complete runs of an earlier 02_fedavg_iid grid are not part of this grid"
        in capsys.readouterr().out
    )
    assert len(list((workspace.root / runs.RUNS_DIR).iterdir())) == 4  # both grids stay in the store
    table = results.fedavg_table(workspace.root)
    assert table["n"].tolist() == [2]  # n = 4 when a table averaged the folder
    assert results.load_runs(workspace.root, experiments.FEDAVG_IID)["lr"].tolist() == [0.01, 0.01]
    record = runs.read_grid(workspace.root, experiments.FEDAVG_IID)
    assert record["params"]["lr"] == 0.01 and len(record["earlier"]) == 2


def test_a_configuration_two_grids_name_is_trained_once_and_read_by_both(workspace, tiny_data):
    shared, other = FedAvgConfig(**FL), FedAvgConfig(**FL, seed=1)
    first = run_grid(
        run_fedavg, workspace, tiny_data, experiments.FEDAVG_IID, configs=[shared], params=PARAMS
    )
    second = run_grid(
        run_fedavg, workspace, tiny_data, experiments.HETEROGENEITY, configs=[shared, other], params=PARAMS
    )
    assert second[0].run.dir == first[0].run.dir and attempts(first[0].run.dir) == 1  # read back
    assert len(list((workspace.root / runs.RUNS_DIR).iterdir())) == 2
    assert len(results.load_runs(workspace.root, experiments.HETEROGENEITY)) == 2


def test_a_search_records_what_it_chose_and_the_value_its_notebook_used(workspace, tiny_data):
    search = [FedAvgConfig(**FL, lr=lr, evaluate_test=False) for lr in (0.01, 0.05)]
    params = {**PARAMS, "lr": 0.2, "weight_decay": None}  # the notebook set lr itself
    used = experiments.run_search(
        run_fedavg,
        workspace,
        tiny_data,
        experiments.FEDAVG_LR_SEARCH,
        configs=search,
        params=params,
        regime="fedavg",
    )
    stored = workspace.load_hparams()
    assert used["lr"] == 0.2 and stored["fedavg_lr"] == 0.2  # later notebooks read the lr 02 trained with
    assert stored["fedavg_search_lr"] in (0.01, 0.05) and stored["fedavg_search_weight_decay"] == FL.get(
        "weight_decay", FedAvgConfig.weight_decay
    )
    assert used["weight_decay"] == stored["fedavg_weight_decay"] == stored["fedavg_search_weight_decay"]
    assert workspace.chosen("lr") == 0.2


# --------------------------------------------------------------------------- notebook cells: grid_table, run

# How each experiment ran when the notebooks called run_grid / run_search themselves: the runner, the
# function that built its configs, the search regime (None: not a search) and, for a grid, `wait`.
AS_THE_NOTEBOOKS_RAN = {
    experiments.LR_SEARCH: (run_centralized, experiments.search_configs, "per_scheduler", None),
    experiments.CENTRALIZED: (run_centralized, experiments.scheduler_configs, "central", None),
    experiments.FEDAVG_LR_SEARCH: (run_fedavg, experiments.fedavg_search_configs, "fedavg", None),
    experiments.FEDAVG_IID: (run_fedavg, experiments.fedavg_iid_configs, None, False),
    experiments.HETEROGENEITY: (run_fedavg, experiments.heterogeneity_configs, None, False),
    experiments.HEAD_ONLY: (run_head_only, experiments.head_only_configs, None, True),
    experiments.SPARSE_LR_SEARCH: (run_fedavg, experiments.sparse_search_configs, "sparse", None),
    experiments.SPARSE_FL: (run_fedavg, experiments.sparse_fl_configs, None, False),
    experiments.SPARSE_CENTRAL_LR_SEARCH: (
        run_centralized,
        experiments.sparse_central_search_configs,
        "sparse_central",
        None,
    ),
    experiments.SPARSE_CENTRAL: (run_centralized, experiments.sparse_central_configs, None, False),
    experiments.MASK_RULES: (run_fedavg, experiments.mask_rule_configs, None, False),
    experiments.FEDAVGM_SEARCH: (run_fedavg, experiments.fedavgm_search_configs, "fedavgm", None),
    experiments.FEDPROX_SEARCH: (run_fedavg, experiments.fedprox_search_configs, "fedprox", None),
    experiments.TIES_SEARCH: (run_fedavg, experiments.ties_search_configs, "ties", None),
    experiments.REMEDIES: (run_fedavg, experiments.remedy_configs, None, False),
}
SMOKE_GRIDS = pipeline.grids("smoke")  # every notebook's grids from its smoke parameters (stand-ins chosen)


def test_every_experiment_a_notebook_runs_has_one_way_to_run():
    named = [experiment for grids in experiments.NOTEBOOK_EXPERIMENTS.values() for experiment in grids]
    assert (
        sorted(named) == sorted(set(named)) == sorted(experiments.EXPERIMENTS) == sorted(AS_THE_NOTEBOOKS_RAN)
    )


@pytest.mark.parametrize("group", SMOKE_GRIDS, ids=[g["experiment"] for g in SMOKE_GRIDS])
def test_run_looks_up_the_runner_configs_search_and_wait_the_notebook_passed_before(group, monkeypatch):
    calls = []

    def grid(runner, ws, data, experiment, *, configs, params, wait=True):
        calls.append({"runner": runner, "experiment": experiment, "configs": configs, "wait": wait})

    def search(runner, ws, data, experiment, *, configs, params, regime):
        calls.append({"runner": runner, "experiment": experiment, "configs": configs, "regime": regime})
        return {**params, "chosen": True}

    monkeypatch.setattr(experiments, "run_grid", grid)
    monkeypatch.setattr(experiments, "run_search", search)
    params = dict(group["params"])
    experiments.run("ws", "data", group["experiment"], params)
    runner, function, regime, wait = AS_THE_NOTEBOOKS_RAN[group["experiment"]]
    [call] = calls
    assert call["runner"] is runner and call["experiment"] == group["experiment"]
    assert call["configs"] == function(**group["params"]) == group["configs"]  # same runs, same order
    if regime is None:
        assert call["wait"] is wait and "chosen" not in params
    else:  # a search's choice reaches the caller's own dict
        assert call["regime"] == regime and params == {**group["params"], "chosen": True}


@pytest.mark.parametrize("group", SMOKE_GRIDS, ids=[g["experiment"] for g in SMOKE_GRIDS])
def test_grid_table_shows_one_row_per_run_in_run_order(group):
    table = experiments.grid_table(group["experiment"], group["params"])
    configs = group["configs"]
    assert len(table) == len(configs) and table.index.tolist() == list(range(1, len(configs) + 1))
    assert {"dataset", "model", "precision"}.isdisjoint(table.columns)  # what every run shares: left out
    fields = [config.to_dict() for config in configs]
    for name in ("seed", "sharding", "scheduler", "local_steps", "rounds", "epochs", "lr"):
        values = [f[name] for f in fields if name in f]
        if len(values) == len(configs) and (len(set(values)) > 1 or name in experiments.GRID_TABLE_FIELDS):
            assert table[name].tolist() == values, name


def test_grid_table_shows_what_varies_and_leaves_out_what_repeats_it():
    [group] = [g for g in SMOKE_GRIDS if g["experiment"] == experiments.SPARSE_FL]
    table = experiments.grid_table(experiments.SPARSE_FL, group["params"])
    assert {"head", "mask_rule", "sparsity", "calibration_rounds", "max_grad_norm"} <= set(table.columns)
    assert {"calibration_samples", "label_mode", "eligible"}.isdisjoint(table.columns)  # sparse runs only
    dense = table[table["mask_rule"].isna()]
    assert dense["sparsity"].isna().all() and len(dense) == 2 * 2 * len(group["params"]["seeds"])
    [group] = [g for g in SMOKE_GRIDS if g["experiment"] == experiments.CENTRALIZED]
    table = experiments.grid_table(experiments.CENTRALIZED, group["params"])
    assert list(table.columns) == ["seed", "epochs", "lr", "weight_decay", "scheduler"]


def test_an_unknown_experiment_is_refused_naming_the_experiments():
    with pytest.raises(
        ConfigError, match=r"experiment='01_lr' is not allowed; choose one of \['01_lr_search'"
    ):
        experiments.grid_table("01_lr", {})
    with pytest.raises(ConfigError, match="experiment='01_lr' is not allowed"):
        experiments.run("ws", "data", "01_lr", {})


def test_a_search_run_from_a_notebook_cell_leaves_its_choice_in_params_for_the_next_cells(
    workspace, tiny_data
):
    tiny = {
        "num_clients": 10,
        "participation": 0.2,
        "client_batch_size": 16,
        "local_steps": 1,
        "fedavg_search_lrs": [0.01, 0.05],
        "fedavg_search_weight_decays": [0.0],
        "fedavg_search_rounds": 1,
        "rounds": 1,
        "seeds": [0],
        "eval_points": 1,
        "eval_subset": 100,
        **PARAMS,
    }
    params = pipeline.notebook_values(discover_notebooks()["02"], "smoke", tiny)
    params["weight_decay"] = 1e-4  # set in the parameters cell: stays
    cell_globals = {"params": params}
    experiments.run(workspace, tiny_data, experiments.FEDAVG_LR_SEARCH, cell_globals["params"])
    chosen = workspace.load_hparams()
    assert (
        cell_globals["params"] is params and params["lr"] == chosen["fedavg_search_lr"] == chosen["fedavg_lr"]
    )
    assert params["weight_decay"] == chosen["fedavg_weight_decay"] == 1e-4
    assert runs.read_grid(workspace.root, experiments.FEDAVG_LR_SEARCH)["params"]["lr"] is None  # as it ran
    table = experiments.grid_table(experiments.FEDAVG_IID, params)  # the next cell sees the choice
    assert table["lr"].tolist() == [chosen["fedavg_search_lr"]]
    assert table["weight_decay"].tolist() == [1e-4]


RACE = """
import sys
from fedta_utils import experiments
from fedta_utils.fedavg import FedAvgConfig, run_fedavg
from fedta_utils.workspace import setup_workspace
ws = setup_workspace("smoke", sys.argv[1], device="cpu", download=False)
data = ws.load_data("synthetic", 0.1, 0, 1000, synthetic_test_size=200)
config = FedAvgConfig(dataset="synthetic", model="tiny_vit", img_size=32, num_clients=10, participation=0.2,
                      local_steps=2, batch_size=16, rounds=4, eval_points=2, eval_subset=100)
[result] = experiments.run_grid(run_fedavg, ws, data, "race", configs=[config],
                                params={"eval_batch_size": 128})
print("final", repr(result.summary["final_val_acc"]), repr(result.summary["final_train_loss"]))
"""


@pytest.mark.slow
def test_two_processes_racing_on_one_run_train_it_once_and_both_read_it(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=600)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    [run_dir] = (tmp_path / "smoke" / runs.RUNS_DIR).iterdir()
    assert attempts(run_dir) == 1  # trained by one process; the other waited and read it back
    finals = [next(line for line in out.splitlines() if line.startswith("final")) for out in outputs]
    assert finals[0] == finals[1]


def test_a_run_whose_holder_stops_without_finishing_it_is_trained_by_the_process_that_waited(
    workspace, tiny_data, monkeypatch, capsys
):
    from fedta_utils import team

    monkeypatch.setattr(team, "WAIT_POLL", 0.01)
    held = [runs.RunLockedError("in use by pid 1 on another host")]  # the holder's lock, then it is gone

    def runner(ws, data, config, **options):
        if held:
            raise held.pop()
        return run_fedavg(ws, data, config, **options)

    [result] = run_grid(
        runner, workspace, tiny_data, experiments.FEDAVG_IID, configs=[FedAvgConfig(**FL)], params=PARAMS
    )
    assert result.run.is_complete and attempts(result.run.dir) == 1
    assert "which another process holds" in capsys.readouterr().out

    def always_locked(*args, **options):
        raise runs.RunLockedError("in use by pid 1 on another host")

    with pytest.raises(team.WaitTimeout, match=r"gave up after waiting 0 s \(wait_limit\): in use by pid 1"):
        run_grid(
            always_locked,
            workspace,
            tiny_data,
            experiments.FEDAVG_IID,
            configs=[FedAvgConfig(**FL, seed=1)],
            params={**PARAMS, "wait_limit": 0},
        )


def test_run_folders_of_the_older_layout_are_named_in_a_warning(tmp_path):
    old = tmp_path / "results" / "smoke" / "02_fedavg_iid" / "iid-s0-ab"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match=r"older fedta layout \(02_fedavg_iid\); they are not read"):
        setup_workspace("smoke", tmp_path / "results", device="cpu", download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_workspace("smoke", tmp_path / "fresh", device="cpu", download=False)


# --------------------------------------------------------------------------- the precision, resolved


def test_no_identity_holds_auto_and_heads_are_keyed_by_the_resolved_precision(workspace, tiny_data):
    fed = FedAvgConfig(**FL, precision="auto", finetune=FineTuneSpec(head="ridge"))
    central = CentralizedConfig(
        dataset="synthetic",
        model="tiny_vit",
        img_size=32,
        epochs=1,
        batch_size=64,
        eval_points=1,
        precision="auto",
    )
    made = [
        run_fedavg(workspace, tiny_data, fed, progress=False),
        run_centralized(workspace, tiny_data, central, progress=False),
        run_head_only(workspace, tiny_data, fed),
    ]
    assert [json.loads((r.run.dir / "config.json").read_text())["precision"] for r in made] == ["fp32"] * 3
    assert fed.head_cache(workspace) == replace(fed, precision="fp32").head_cache(workspace)
    assert replace(fed, precision="fp16").head_cache(workspace) != replace(fed, precision="bf16").head_cache(
        workspace
    )


def test_a_run_another_device_started_at_its_precision_is_refused_naming_both(workspace, tiny_data):
    config = FedAvgConfig(**FL, precision="auto")
    on_a_t4 = workspace.run(config.run_name(), {**config.to_dict(), "precision": "fp16"})
    with on_a_t4:  # a T4 resolved 'auto' to fp16 and started the run there
        pass
    with pytest.raises(
        ConfigError,
        match=r"holds this run at precision fp16, started on another device, and "
        r"this device resolves precision='auto' to fp32.*precision='fp16'",
    ):
        run_grid(run_fedavg, workspace, tiny_data, experiments.FEDAVG_IID, configs=[config], params=PARAMS)
    assert [p.name for p in (workspace.root / runs.RUNS_DIR).iterdir()] == [on_a_t4.dir.name]  # nothing new
    explicit = run_fedavg(workspace, tiny_data, replace(config, precision="fp32"), progress=False)
    assert explicit.run.config["precision"] == "fp32"  # a precision set by name is the user's choice


# --------------------------------------------------------------------------- checkpoints sized for Drive


def saved_steps(monkeypatch) -> list:
    """The steps of every checkpoint written from now on, with its bytes."""
    saved, real_save = [], runs.Run.save_checkpoint

    def recording_save(self, checkpoint):
        real_save(self, checkpoint)
        saved.append((checkpoint.step, (self.dir / f"checkpoint-{checkpoint.step:06d}.pt").stat().st_size))

    monkeypatch.setattr(runs.Run, "save_checkpoint", recording_save)
    return saved


def test_by_default_a_run_checkpoints_when_the_clock_says_15_minutes_passed(
    workspace, tiny_data, monkeypatch
):
    minutes = iter(range(0, 1000, 6))  # the fake clock: each reading is 6 minutes after the last
    monkeypatch.setattr(runs, "wall_clock", lambda: 60.0 * next(minutes))
    saved = saved_steps(monkeypatch)
    run_fedavg(workspace, tiny_data, FedAvgConfig(**{**FL, "rounds": 8}), progress=False)
    # readings: 0 at the start, then 6, 12, 18 (a checkpoint: 18 - 0 >= 15), 24, 30, 36 (36 - 18 >= 15), ...
    assert [step for step, _ in saved] == [3, 6]  # none at round 8, the last: the run finishes there
    monkeypatch.setattr(runs, "wall_clock", lambda: 60.0 * next(minutes))
    saved.clear()
    run_fedavg(
        workspace,
        tiny_data,
        FedAvgConfig(**{**FL, "rounds": 8, "seed": 1}),
        checkpoint_every=3,
        progress=False,
    )
    assert [step for step, _ in saved] == [3, 6]  # the round-count option, whatever the clock


def test_a_checkpoint_is_emptied_before_it_is_deleted_so_drives_bin_keeps_nothing(tmp_path, monkeypatch):
    sizes_when_deleted, real_unlink = [], runs.Path.unlink

    def recording_unlink(path, missing_ok=False):
        if path.name.startswith("checkpoint-"):
            sizes_when_deleted.append(path.stat().st_size)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(runs.Path, "unlink", recording_unlink)
    with runs.Run(tmp_path, "a", {"lr": 0.1}) as run:
        for step in (1, 2, 3):  # the third replaces the first: pruned
            run.save_checkpoint(runs.Checkpoint(step, {"weights": torch.ones(1000)}, [], []))
        run.finish({"final_val_acc": 0.5}, [], [])  # the other two: deleted on completion
    assert sizes_when_deleted == [0, 0, 0] and not list(run.dir.glob("checkpoint-*"))


class Killed(Exception):
    """Stands for a process killed mid-run."""


def test_a_sparse_centralized_run_resumes_bit_identical_from_its_trainable_entries(
    tmp_path, tiny_data, monkeypatch
):
    from fedta_utils import training

    config = CentralizedConfig(
        dataset="synthetic",
        model="tiny_vit",
        img_size=32,
        epochs=3,
        batch_size=64,
        eval_points=3,
        warmup_epochs=0.5,
        finetune=SPARSE,
    )  # 9 steps an epoch
    ws_a, ws_b = (setup_workspace("smoke", tmp_path / name, device="cpu", download=False) for name in "ab")
    reference = run_centralized(ws_a, tiny_data, config, save_weights=True, progress=False)
    real_evaluate, calls = training.evaluate_splits, []

    def die_in_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("during epoch 2's evaluation, after epoch 1's checkpoint")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_splits", die_in_the_second_evaluation)
    saved = saved_steps(monkeypatch)
    with pytest.raises(Killed):
        run_centralized(ws_b, tiny_data, config, checkpoint_every=1, save_weights=True, progress=False)
    monkeypatch.setattr(training, "evaluate_splits", real_evaluate)
    resumed = run_centralized(ws_b, tiny_data, config, checkpoint_every=1, save_weights=True, progress=False)
    assert [step for step, _ in saved] == [1, 2]  # the resumed run started from epoch 1's checkpoint
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()
    weights, expected = (torch.load(r.run.dir / "model.pt", weights_only=True) for r in (resumed, reference))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    dense = pipeline.checkpoint_bytes(replace(config, finetune=FineTuneSpec()))
    assert saved[0][1] < 0.3 * dense  # sparsity 0.9: a tenth of the weights and buffers


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "sparse", "centralized", "centralized_sparse"])
def test_the_dry_run_knows_the_bytes_of_each_checkpoint(kind, workspace, tiny_data, monkeypatch):
    fed = FedAvgConfig(**{**FL, "rounds": 3})
    central = CentralizedConfig(
        dataset="synthetic", model="tiny_vit", img_size=32, epochs=2, batch_size=64, eval_points=1
    )
    config = {
        "fedavg": fed,
        "fedavgm": replace(fed, server_momentum=0.9),
        "sparse": replace(fed, finetune=SPARSE),
        "centralized": central,
        "centralized_sparse": replace(central, finetune=SPARSE),
    }[kind]
    saved = saved_steps(monkeypatch)
    runner = run_centralized if kind.startswith("centralized") else run_fedavg
    runner(workspace, tiny_data, config, checkpoint_every=1, progress=False)
    assert saved and all(
        size == pytest.approx(pipeline.checkpoint_bytes(config), rel=0.05) for _, size in saved
    )


def test_a_sparse_fedavg_checkpoint_holds_only_the_entries_its_mask_lets_change(
    workspace, tiny_data, monkeypatch
):
    dense, sparse = FedAvgConfig(**{**FL, "rounds": 3}), FedAvgConfig(**{**FL, "rounds": 3}, finetune=SPARSE)
    saved = saved_steps(monkeypatch)
    run_fedavg(workspace, tiny_data, dense, checkpoint_every=1, progress=False)
    run_fedavg(workspace, tiny_data, sparse, checkpoint_every=1, progress=False)
    assert saved[-1][1] < 0.3 * saved[0][1]  # sparsity 0.9 of the backbone


@pytest.mark.slow
def test_with_the_round_count_option_the_dry_run_predicts_the_checkpoint_bytes_a_smoke_notebook_writes(
    tmp_path, monkeypatch
):
    """Notebook 02's smoke grids, one seed, a checkpoint every round: the dry-run's bytes, then a run's."""
    overrides = {"seeds": [0], "checkpoint_every": 1, "results_dir": str(tmp_path)}
    groups = pipeline.grids("smoke", ["02"], overrides)
    planned = pipeline.run_table(groups)
    expected = sum(pipeline.checkpoint_count(run, 0.0) * run["state_bytes"] for _, run in planned.iterrows())
    from fedta_utils.workspace import setup_notebook

    namespace = {**groups[0]["params"], "lr": None, "weight_decay": None}
    ws, data, params = setup_notebook("02", namespace, device="cpu")
    saved = saved_steps(monkeypatch)
    params = experiments.run_search(
        run_fedavg,
        ws,
        data,
        experiments.FEDAVG_LR_SEARCH,
        configs=experiments.fedavg_search_configs(**params),
        params=params,
        regime="fedavg",
    )
    run_grid(
        run_fedavg,
        ws,
        data,
        experiments.FEDAVG_IID,
        configs=experiments.fedavg_iid_configs(**params),
        params=params,
    )
    assert len(saved) == sum(pipeline.checkpoint_count(run, 0.0) for _, run in planned.iterrows())
    assert sum(size for _, size in saved) == pytest.approx(expected, rel=0.05)


# ------------------------------------------------------------------- comparisons that compare like with like


def finished(config, val_acc: float) -> RunResult:
    """A run of `config` as run_grid returns it, with only what a search reads: its config and score."""
    return RunResult(SimpleNamespace(config=config.to_dict()), {"final_val_acc": val_acc}, None)


def notebook_params(key: str) -> dict:
    """Notebook `key`'s smoke parameters as its cells see them: stand-ins for what earlier notebooks chose."""
    path = discover_notebooks()[key]
    params = pipeline.notebook_values(path, "smoke", {})
    stand_ins = experiments.with_stand_ins(params)
    return {name: value for name, value in stand_ins.items() if name in params}


def search_with(monkeypatch, scores) -> list:
    """run_grid replaced by one that 'runs' each config to the score scores(config) gives."""
    grids = []

    def grid(runner, ws, data, experiment, *, configs, params, wait=True):
        grids.append(configs)
        return [finished(config, scores(config)) for config in configs]

    monkeypatch.setattr(experiments, "run_grid", grid)
    return grids


def test_notebook_01_searches_every_scheduler_and_compares_each_at_its_own_lr(workspace, monkeypatch):
    params = notebook_params("01")
    best_lr = {"cosine": 0.1, "step": 0.1, "constant": 0.03}  # a constant rate wants a lower lr
    search_with(monkeypatch, lambda c: 0.5 + (c.lr == best_lr[c.scheduler]) * 0.1 - c.weight_decay)
    searched = experiments.grid_configs(experiments.LR_SEARCH, params)
    assert {(c.scheduler, c.lr) for c in searched} == {
        (s, lr) for s in params["schedulers"] for lr in params["search_lrs"]
    }
    assert {c.evaluate_test for c in searched} == {False}
    experiments.run(workspace, None, experiments.LR_SEARCH, params)
    compared = experiments.grid_configs(experiments.CENTRALIZED, params)
    assert {(c.scheduler, c.lr, c.weight_decay) for c in compared} == {
        (s, lr, 0.0) for s, lr in best_lr.items()
    }
    stored = workspace.load_hparams()["scheduler_search"]
    assert {s: v["lr"] for s, v in stored.items()} == best_lr
    assert {c.full_val_curve for c in compared} == {True}  # "how many epochs" reads one set of images


def test_notebook_01_stores_the_scheduler_best_on_validation_averaged_over_seeds(workspace, monkeypatch):
    params = notebook_params("01")  # as the lr search left them
    params["scheduler_hparams"] = {
        s: {"lr": 0.01 * (i + 1), "weight_decay": 0.0} for i, s in enumerate(SCHEDULERS)
    }
    # step wins one seed by far, constant wins on average
    scores = {("step", 0): 0.9, ("step", 1): 0.1, ("constant", 0): 0.6, ("constant", 1): 0.6}
    search_with(monkeypatch, lambda c: scores.get((c.scheduler, c.seed), 0.2))
    experiments.run(workspace, None, experiments.CENTRALIZED, params)
    stored = workspace.load_hparams()
    assert (stored["central_scheduler"], stored["central_lr"]) == ("constant", 0.03)
    assert (stored["central_batch_size"], stored["central_epochs"]) == (
        params["central_batch_size"],
        params["epochs"],
    )
    assert (
        workspace.chosen("central_scheduler") == "constant"
        and workspace.chosen("central_weight_decay") == 0.0
    )


def test_the_centralized_sparse_baseline_takes_its_lr_from_its_own_validation_search(workspace, monkeypatch):
    params = notebook_params("04")
    params.update(central_scheduler="step", central_weight_decay=1e-4, sparse_central_lr=None)
    search_with(monkeypatch, lambda c: 1.0 - abs(c.lr - 0.003))  # 0.003 is best
    searched = experiments.grid_configs(experiments.SPARSE_CENTRAL_LR_SEARCH, params)
    assert [c.lr for c in searched] == params["sparse_central_search_lrs"]  # its own grid
    assert {(c.scheduler, c.weight_decay, c.seed, c.evaluate_test) for c in searched} == {
        ("step", 1e-4, 0, False)
    }
    assert {c.finetune.mask_rule for c in searched} == {"least_sensitive"}  # under the frozen head, masked
    assert {c.epochs for c in searched} == {params["search_epochs"]}
    experiments.run(workspace, None, experiments.SPARSE_CENTRAL_LR_SEARCH, params)
    assert params["sparse_central_lr"] == workspace.load_hparams()["sparse_central_lr"] == 0.003
    baseline = experiments.grid_configs(experiments.SPARSE_CENTRAL, params)
    assert {(c.lr, c.scheduler, c.weight_decay) for c in baseline} == {(0.003, "step", 1e-4)}
    assert [c.seed for c in baseline] == params["seeds"]
    assert {c.batch_size for c in baseline} == {params["central_batch_size"]}  # notebook 01's batch, by name


def test_notebook_04_takes_the_weight_decay_01_chose_for_the_scheduler_it_uses(workspace):
    per_scheduler = {
        "cosine": {"lr": 0.1, "weight_decay": 1e-4},
        "constant": {"lr": 0.03, "weight_decay": 0.0},
    }
    workspace.save_hparams(
        {"scheduler_search": per_scheduler, "central_scheduler": "constant", "central_weight_decay": 0.0}
    )
    params = {"central_scheduler": None, "central_weight_decay": None}
    read_chosen(workspace, "04", params, wait=False)
    assert params == {"central_scheduler": "constant", "central_weight_decay": 0.0}
    params = {"central_scheduler": "cosine", "central_weight_decay": None}  # a scheduler set by hand
    read_chosen(workspace, "04", params, wait=False)
    assert params["central_weight_decay"] == 1e-4


def test_notebook_04_refuses_a_centralized_schedule_other_than_01s(workspace):
    check_central_schedule(workspace, "04", {"central_batch_size": 128})  # 01 has not run: nothing to compare
    workspace.save_hparams({"central_batch_size": 64, "central_epochs": 2, "central_momentum": 0.9})
    check_central_schedule(workspace, "04", {"central_batch_size": 64, "epochs": 2, "central_momentum": 0.9})
    with pytest.raises(ConfigError, match="central_batch_size=128, but notebook 01 ran its schedulers with"):
        check_central_schedule(workspace, "04", {"central_batch_size": 128})
    with pytest.raises(ConfigError, match="epochs=6, but notebook 01"):
        check_central_schedule(workspace, "04", {"epochs": 6})
    check_central_schedule(workspace, "01", {"central_batch_size": 128})  # 01 itself may change it


def test_the_searches_and_the_tables_break_a_tie_alike():
    """On equal validation accuracy: the lower lr, then the first in order (results.choose, seed_means)."""
    table = pd.DataFrame(
        {"scheduler": ["cosine", "step", "constant"], "lr": [0.1, 0.1, 0.03], "val": [0.5, 0.4, 0.5]}
    )
    assert results.choose(table)["chosen"].tolist() == [False, False, True]
    base = CentralizedConfig(dataset="synthetic", model="tiny_vit")
    runs = [finished(replace(base, scheduler=s, lr=lr), v) for s, lr, v in table.itertuples(index=False)]
    assert experiments.seed_means(runs, ["scheduler", "lr"])[0]["scheduler"] == "constant"
    same_lr = table.assign(lr=0.1)
    assert results.choose(same_lr)["chosen"].tolist() == [True, False, False]  # then the first


def test_a_search_says_when_its_choice_is_at_the_edge_of_its_grid(capsys):
    experiments.warn_at_edge([0.03, 0.01, 0.1], 0.1, "lr")
    assert "the chosen lr 0.1 is at the edge of the grid [0.01, 0.03, 0.1]" in capsys.readouterr().out
    experiments.warn_at_edge([0.03, 0.01, 0.1], 0.03, "lr")
    experiments.warn_at_edge([0.01], 0.01, "lr")  # a grid of one lr has no edge to speak of
    experiments.warn_at_edge([0.01, 0.1], 0.1, "lr")  # nor one of two
    assert capsys.readouterr().out == ""
