"""The grids each notebook runs, and the run of notebook 04's step-0 head alone.

Each `*_configs` function turns a notebook's parameters (same names as in its
parameters cell) into the list of run configs the notebook executes; EXPERIMENTS
names it for every experiment. A notebook cell names only the experiment:

    experiments.grid_table(experiments.CENTRALIZED, params)     # the runs about to run
    experiments.run(ws, data, experiments.CENTRALIZED, params)  # runs them

and `pipeline --dry-run` builds the same grids to count runs and estimate their
cost, so the budget always describes what will really run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd

from . import team
from .checks import (
    ConfigError,
    check_choice,
    check_choice_list,
    check_float,
    check_float_list,
    check_int,
    check_int_list,
    check_seeds,
)
from .fedavg import FedAvgConfig, FedAvgRun, run_fedavg
from .masks import RULES
from .optim import SCHEDULERS
from .prepare import FineTuneSpec
from .runs import RunLockedError, record_grid
from .sharding import make_shards, shard_stats
from .training import (
    CentralizedConfig,
    RunResult,
    check_run_options,
    run_centralized,
    run_folder,
    train_or_read,
)

# Experiment folder names under <results_dir>/<profile>/ (read by notebook 07 and the report).
LR_SEARCH = "01_lr_search"
CENTRALIZED = "01_centralized"
FEDAVG_LR_SEARCH = "02_lr_search"
FEDAVG_IID = "02_fedavg_iid"
HETEROGENEITY = "03_heterogeneity"
SPARSE_LR_SEARCH = "04_lr_search"
SPARSE_FL = "04_sparse_fl"
SPARSE_CENTRAL_LR_SEARCH = "04_central_lr_search"
SPARSE_CENTRAL = "04_sparse_centralized"
HEAD_ONLY = "04_head_only"
MASK_RULES = "05_mask_rules"
FEDAVGM_SEARCH = "06_fedavgm_search"
FEDPROX_SEARCH = "06_fedprox_search"
TIES_SEARCH = "06_ties_search"
REMEDIES = "06_remedies"
RUN_OPTIONS = ("eval_batch_size", "checkpoint_every", "checkpoint_minutes")  # notebook parameters -> runners


# --------------------------------------------------------------------------- notebook 00


def data_splits(ws, data, params: dict) -> None:
    """Notebook 00: split sizes and per-client shard statistics of every scheme, as CSVs for the report."""
    sizes = [
        (name, getattr(data, split).labels.cpu().numpy())
        for name, split in (("train", "train"), ("validation", "val"), ("test", "test"))
    ]
    ws.save_frame(
        "00_data/split_sizes.csv",
        pd.DataFrame(
            [
                {
                    "split": name,
                    "images": len(y),
                    "min per class": np.bincount(y).min(),
                    "max per class": np.bincount(y).max(),
                }
                for name, y in sizes
            ]
        ),
    )
    schemes = {"iid": {"sharding": "iid"}}
    schemes.update(
        {
            f"Nc={nc}": {"sharding": "non_iid", "classes_per_client": nc}
            for nc in check_int_list("classes_per_client_grid", params["classes_per_client_grid"])
        }
    )
    schemes[f"Dir({params['dirichlet_alpha']:g})"] = {
        "sharding": "dirichlet",
        "dirichlet_alpha": params["dirichlet_alpha"],
    }
    labels = data.train_labels_numpy()
    stats = [
        shard_stats(
            make_shards(labels, num_clients=params["num_clients"], seed=params["shard_seed"], **options),
            labels,
            data.num_classes,
        ).assign(scheme=scheme)
        for scheme, options in schemes.items()
    ]
    ws.save_frame("00_data/shard_stats.csv", pd.concat(stats, ignore_index=True))


# --------------------------------------------------------------------------- notebook 01


def central_config(
    dataset, model, epochs, *, central_batch_size, central_momentum, warmup_epochs, precision, **params
) -> CentralizedConfig:
    """The settings every centralized run of notebooks 01 and 04 shares (the batch, momentum, schedule
    length and warm-up), at default lr, weight decay and scheduler."""
    return CentralizedConfig(
        dataset=dataset,
        model=model,
        epochs=epochs,
        batch_size=check_int("central_batch_size", central_batch_size, minimum=1),
        momentum=check_float("central_momentum", central_momentum, 0.0, 1.0, high_open=True),
        warmup_epochs=warmup_epochs,
        precision=precision,
        **evaluation(**params),
    )


def evaluation(eval_points=10, eval_subset=1000, img_size=None, **_) -> dict:
    """The evaluation and input-size fields every config of a notebook shares."""
    return {"eval_points": eval_points, "eval_subset": eval_subset, "img_size": img_size}


def shortened(config, epochs: int, seed: int):
    """`config` as a search run: `epochs` long (its warm-up capped by them), one seed, validation only."""
    return replace(
        config,
        epochs=epochs,
        warmup_epochs=min(config.warmup_epochs, epochs),
        seed=seed,
        evaluate_test=False,
    )


def search_configs(
    search_lrs, search_weight_decays, search_epochs, schedulers, *, search_seed: int = 0, **params
) -> list[CentralizedConfig]:
    """Notebook 01: the learning-rate x weight-decay grid under every scheduler compared, `search_epochs`
    long, one seed, judged on validation only; each scheduler gets its own choice."""
    lrs = check_float_list("search_lrs", search_lrs, 0.0, None, low_open=True)
    wds = check_float_list("search_weight_decays", search_weight_decays, 0.0, None)
    epochs = check_int("search_epochs", search_epochs, minimum=1)
    seed = check_int("search_seed", search_seed, minimum=0)
    base = shortened(central_config(**params), epochs, seed)
    return [
        replace(base, scheduler=scheduler, lr=lr, weight_decay=wd)
        for scheduler in check_choice_list("schedulers", schedulers, SCHEDULERS)
        for lr in lrs
        for wd in wds
    ]


def scheduler_configs(seeds, schedulers, scheduler_hparams, **params) -> list[CentralizedConfig]:
    """Notebook 01: every scheduler at its own lr and weight decay (scheduler_hparams, which the search
    sets: {scheduler: {'lr': ..., 'weight_decay': ...}}), every seed. The validation curve is evaluated
    on the full split at every point: "how many epochs" is read from it."""
    seeds = check_seeds(seeds)
    base = replace(central_config(**params), full_val_curve=True)
    configs = []
    for scheduler in check_choice_list("schedulers", schedulers, SCHEDULERS):
        if scheduler not in scheduler_hparams:
            raise ConfigError(f"scheduler_hparams has no lr and weight decay for scheduler {scheduler!r}")
        chosen = scheduler_hparams[scheduler]
        at_chosen = replace(base, scheduler=scheduler, lr=chosen["lr"], weight_decay=chosen["weight_decay"])
        configs += [replace(at_chosen, seed=seed) for seed in seeds]
    return configs


# Per search: the notebook parameters it sets -> the config field each takes; the choice is the
# configuration of these fields with the highest final validation accuracy averaged over seeds.
SEARCHED = {
    "central": {"central_scheduler": "scheduler", "central_lr": "lr", "central_weight_decay": "weight_decay"},
    "fedavg": {"lr": "lr", "weight_decay": "weight_decay"},
    "sparse": {"sparse_lr": "lr"},
    "sparse_central": {"sparse_central_lr": "lr"},
    "fedavgm": {"fedavgm_server_lr": "server_lr", "fedavgm_server_momentum": "server_momentum"},
    "fedprox": {"prox_mu": "prox_mu"},
    "ties": {"ties_density": "ties_density", "ties_server_lr": "server_lr"},
}


# Notebook parameter -> config field of the schedule notebook 01's scheduler comparison ran with: stored
# with its choice (hparams central_<field>), and notebook 04's centralized sparse baseline must share it.
CENTRAL_SCHEDULE = {
    "central_batch_size": "batch_size",
    "epochs": "epochs",
    "warmup_epochs": "warmup_epochs",
    "central_momentum": "momentum",
}


def seed_means(results: list[RunResult], fields: list[str]) -> list[dict]:
    """Per value of the config `fields`: those fields and `val`, the final validation accuracy averaged
    over seeds; best first: the highest `val`, on a tie the lower lr (where lr is a field), then the
    first in grid order."""
    rows = [{**{f: r.run.config[f] for f in fields}, "val": r.summary["final_val_acc"]} for r in results]
    table = pd.DataFrame(rows).groupby(fields, sort=False)["val"].mean().reset_index()
    if "lr" in fields:
        table = table.sort_values("lr", kind="stable")
    table = table.sort_values("val", ascending=False, kind="stable")  # stable: ties keep the order above
    return table.to_dict("records")


def run_search(runner, ws, data, experiment: str, *, configs: list, params: dict, regime: str) -> dict:
    """A search stage (every worker's share done first); returns `params` with its choice where they
    are None (with_choice).

    hparams.json, which the later notebooks read, records both: {regime}_search_lr (and the other
    fields of SEARCHED[regime], and _search_val_acc) what the search chose, {regime}_lr (...) the
    value this notebook uses, its own where the notebook set one. Regime 'central' (notebook 01's
    scheduler comparison), 'fedavg' (02), 'sparse' and 'sparse_central' (04); notebook 01's lr search
    chooses per scheduler (run_scheduler_search)."""
    results = run_grid(runner, ws, data, experiment, configs=configs, params=params)
    if regime == "per_scheduler":
        return run_scheduler_search(ws, results, params)
    searched = SEARCHED[regime]
    top = seed_means(results, list(searched.values()))[0]
    edges = [] if regime == "central" else searched.values()  # each scheduler runs at its own lr: no grid
    for field in edges:
        warn_at_edge([getattr(c, field) for c in configs], top[field], field)
    params = with_choice(params, top, regime)
    record = {f"{regime}_search_val_acc": top["val"]}
    for name, field in searched.items():
        record[f"{regime}_search_{field}"] = top[field]
        record[f"{regime}_{field}"] = params[name]
    if regime == "central":  # the schedule notebook 04's centralized sparse baseline must share
        record.update({f"central_{field}": getattr(configs[0], field) for field in CENTRAL_SCHEDULE.values()})
    ws.save_hparams(record)
    print("chosen on validation, and used:", record)
    return params


def run_scheduler_search(ws, results: list[RunResult], params: dict) -> dict:
    """Notebook 01's lr search: per scheduler, the lr and weight decay of the best run (seed_means);
    `params` with them as scheduler_hparams, also stored in hparams.json (scheduler_search)."""
    chosen = {}
    record = {}
    for row in seed_means(results, ["scheduler", "lr", "weight_decay"]):
        if row["scheduler"] in chosen:
            continue  # the first row of a scheduler is its best
        chosen[row["scheduler"]] = {"lr": row["lr"], "weight_decay": row["weight_decay"]}
        grid = [r.run.config["lr"] for r in results if r.run.config["scheduler"] == row["scheduler"]]
        warn_at_edge(grid, row["lr"], "lr")
        record[row["scheduler"]] = {**chosen[row["scheduler"]], "val_acc": row["val"]}
    ws.save_hparams({"scheduler_search": record})
    print("chosen on validation, per scheduler:", record)
    return {**params, "scheduler_hparams": chosen}


def warn_at_edge(grid: list[float], value: float, name: str) -> None:
    """Say so when a search chose the smallest or largest `name` of its grid: a wider grid may do better."""
    values = sorted(set(grid))
    if len(values) > 2 and value in (values[0], values[-1]):  # of two values, either is an edge
        print(
            f"note: the chosen {name} {value:g} is at the edge of the grid {values}; a wider grid may find "
            "a better one"
        )


def with_choice(params: dict, chosen, regime: str) -> dict:
    """`params` where the searched parameters (SEARCHED[regime]) that are None take the `chosen`
    values of their fields (explicit values stay)."""
    searched = SEARCHED[regime].items()
    choices = {name: chosen[field] for name, field in searched if params.get(name) is None}
    return {**params, **choices}


# --------------------------------------------------------------------------- notebooks 02 and 03


def fedavg_base(
    dataset,
    model,
    num_clients,
    participation,
    *,
    client_batch_size,
    lr,
    weight_decay,
    momentum,
    lr_schedule,
    server_lr,
    server_momentum,
    precision,
    **params,
) -> FedAvgConfig:
    """The settings every FedAvg run of notebooks 02-05 shares."""
    return FedAvgConfig(
        dataset=dataset,
        model=model,
        num_clients=num_clients,
        participation=participation,
        batch_size=check_int("client_batch_size", client_batch_size, minimum=1),
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        lr_schedule=lr_schedule,
        server_lr=server_lr,
        server_momentum=server_momentum,
        precision=precision,
        **evaluation(**params),
    )


def fedavg_search_configs(
    fedavg_search_lrs,
    fedavg_search_weight_decays,
    fedavg_search_rounds,
    local_steps,
    *,
    search_seed: int = 0,
    **params,
) -> list[FedAvgConfig]:
    """Notebook 02: the client lr x weight-decay grid (iid, J, fewer rounds, one seed), judged on val."""
    lrs = check_float_list("fedavg_search_lrs", fedavg_search_lrs, 0.0, None, low_open=True)
    wds = check_float_list("fedavg_search_weight_decays", fedavg_search_weight_decays, 0.0, None)
    rounds = check_int("fedavg_search_rounds", fedavg_search_rounds, minimum=1)
    base = fedavg_base(**{**params, "lr": 1.0, "weight_decay": 0.0})
    return [
        replace(
            base,
            seed=check_int("search_seed", search_seed, minimum=0),
            local_steps=local_steps,
            rounds=rounds,
            lr=lr,
            weight_decay=wd,
            evaluate_test=False,
        )
        for lr in lrs
        for wd in wds
    ]


# Notebook 02's runs, and notebook 03's iid runs so that those at the first J are 02's: the validation
# curve on the full split at every point, the one set the late-round gain is read from.
IID_CURVES = {"sharding": "iid", "full_val_curve": True}


def fedavg_iid_configs(seeds, local_steps, rounds, **params) -> list[FedAvgConfig]:
    """Notebook 02: iid shards, the chosen J and rounds, every seed."""
    base = fedavg_base(**params)
    return [
        replace(base, seed=s, local_steps=local_steps, rounds=rounds, **IID_CURVES)
        for s in check_seeds(seeds)
    ]


def scaled_rounds(base_rounds: int, base_local_steps: int, local_steps: int) -> int:
    """Rounds for J local steps so that rounds * J stays constant (at least one round)."""
    return max(1, round(base_rounds * base_local_steps / local_steps))


def heterogeneity_configs(
    seeds, classes_per_client_grid, local_steps_grid, base_rounds, **params
) -> list[FedAvgConfig]:
    """Notebook 03: (iid + non-iid Nc) x J, rounds scaled so rounds * J is constant."""
    seeds = check_seeds(seeds)
    grid_nc = check_int_list("classes_per_client_grid", classes_per_client_grid, minimum=1)
    grid_j = check_int_list("local_steps_grid", local_steps_grid, minimum=1)
    base_rounds = check_int("base_rounds", base_rounds, minimum=1)
    base = fedavg_base(**params)
    shardings = [IID_CURVES] + [{"sharding": "non_iid", "classes_per_client": nc} for nc in grid_nc]
    return [
        replace(base, seed=s, local_steps=j, rounds=scaled_rounds(base_rounds, grid_j[0], j), **sharding)
        for sharding in shardings
        for j in grid_j
        for s in seeds
    ]


# --------------------------------------------------------------------------- notebooks 04 and 05

SPEC_PARAMETERS = ("head", "ridge_lambda", "calibration_samples", "label_mode", "eligible", "max_grad_norm")


def finetune_spec(params: dict, **overrides) -> FineTuneSpec:
    """A FineTuneSpec from the notebook parameters named in SPEC_PARAMETERS, plus overrides."""
    fields = {k: params[k] for k in SPEC_PARAMETERS if k in params}
    fields.update(overrides)
    return FineTuneSpec(**fields)


def _fl_shardings(sparse_classes_per_client) -> list[dict]:
    nc = check_int("sparse_classes_per_client", sparse_classes_per_client, minimum=1)
    return [{"sharding": "iid"}, {"sharding": "non_iid", "classes_per_client": nc}]


def sparse_settings(sparsities, calibration_rounds_grid, sparsity, calibration_rounds) -> list[tuple]:
    """(sparsity, R) of notebook 04's two one-dimensional sweeps around the default (sparsity, R):
    every sparsity at the default R, then every other R at the default sparsity (the default itself
    always among them)."""
    sparsities = check_float_list("sparsities", sparsities, 0.0, 1.0, high_open=True)
    grid_r = check_int_list("calibration_rounds_grid", calibration_rounds_grid, minimum=1)
    check_float("sparsity", sparsity, 0.0, 1.0, high_open=True)
    check_int("calibration_rounds", calibration_rounds, minimum=1)
    settings = [(sp, calibration_rounds) for sp in sparsities] + [(sparsity, r) for r in grid_r]
    return list(dict.fromkeys(settings + [(sparsity, calibration_rounds)]))


def sweeps(table: pd.DataFrame) -> dict:
    """Notebook 04's two sweeps in results.sparse_table's rows of one sharding: {'sparsity': rows at the
    default R, 'calibration_rounds': rows at the default sparsity}; a default is the value the other
    sweep holds fixed."""
    sparse = table[table["method"] == "sparse"]
    default_r = sparse.groupby("calibration_rounds")["sparsity"].nunique().idxmax()
    default_sparsity = sparse.groupby("sparsity")["calibration_rounds"].nunique().idxmax()
    return {
        "sparsity": sparse[sparse["calibration_rounds"] == default_r],
        "calibration_rounds": sparse[sparse["sparsity"] == default_sparsity],
    }


def sparse_search_configs(sparse_search_lrs, sparse_search_rounds, **params) -> list[FedAvgConfig]:
    """Notebook 04: the client lr of fine-tuning under the frozen step-0 head, judged on validation: the
    grid's default-setting run (iid, first seed) at each lr, with fewer rounds."""
    lrs = check_float_list("sparse_search_lrs", sparse_search_lrs, 0.0, None, low_open=True)
    rounds = check_int("sparse_search_rounds", sparse_search_rounds, minimum=1)
    stand_in = 1.0 if params.get("sparse_lr") is None else params["sparse_lr"]  # a set value is checked too
    grid = sparse_fl_configs(**{**params, "sparse_lr": stand_in})
    default = finetune_spec(
        params,
        mask_rule="least_sensitive",
        sparsity=params["sparsity"],
        calibration_rounds=params["calibration_rounds"],
    )
    first = next(c for c in grid if c.sharding == "iid" and c.finetune == default)
    return [replace(first, lr=lr, rounds=rounds, evaluate_test=False) for lr in lrs]


def sparse_fl_configs(
    seeds,
    sparsities,
    calibration_rounds_grid,
    sparsity,
    *,
    calibration_rounds,
    sparse_classes_per_client,
    local_steps,
    rounds,
    sparse_lr,
    **params,
) -> list[FedAvgConfig]:
    """Notebook 04: the sparsity and R sweeps (least-sensitive rule) on iid shards; the default setting
    on one non-iid Nc. Each sharding also gets the dense baselines with the same rounds: the frozen
    step-0 head with a dense backbone, and plain FedAvg (trained head, FedAvg's lr). Every run under the
    frozen head trains at `sparse_lr`."""
    seeds = check_seeds(seeds)
    iid_settings = sparse_settings(sparsities, calibration_rounds_grid, sparsity, calibration_rounds)
    base, under_head = fl_bases(params, local_steps, rounds, sparse_lr)
    configs = []
    for sharding in _fl_shardings(sparse_classes_per_client):
        settings = iid_settings if sharding["sharding"] == "iid" else [(sparsity, calibration_rounds)]
        for s in seeds:
            configs.append(replace(base, seed=s, finetune=FineTuneSpec(), **sharding))
            configs.append(replace(under_head, seed=s, finetune=finetune_spec(params), **sharding))
            configs += [
                replace(
                    under_head,
                    seed=s,
                    **sharding,
                    finetune=finetune_spec(
                        params, mask_rule="least_sensitive", sparsity=sp, calibration_rounds=r
                    ),
                )
                for sp, r in settings
            ]
    return configs


def fl_bases(params: dict, local_steps, rounds, sparse_lr) -> tuple[FedAvgConfig, FedAvgConfig]:
    """Notebooks 04 and 06's runs before seed, sharding and mask: dense FedAvg at FedAvg's lr, and the same
    under the frozen head at `sparse_lr`; built once here, so the runs the notebooks share are one config."""
    base = replace(fedavg_base(**params), local_steps=local_steps, rounds=rounds)
    return base, replace(base, lr=check_float("sparse_lr", sparse_lr, 0.0, None, low_open=True))


def head_only_configs(seeds, sparse_classes_per_client, **params) -> list[FedAvgConfig]:
    """Notebook 04: the step-0 head alone (no fine-tuning, so no clipping), per sharding and seed."""
    base = replace(fedavg_base(**params), rounds=1, local_steps=1)
    return [
        replace(base, seed=s, finetune=finetune_spec(params, max_grad_norm=None), **sharding)
        for sharding in _fl_shardings(sparse_classes_per_client)
        for s in check_seeds(seeds)
    ]


def sparse_central_configs(
    seeds,
    sparsity,
    calibration_rounds,
    *,
    central_scheduler,
    central_weight_decay,
    sparse_central_lr,
    **params,
) -> list[CentralizedConfig]:
    """Notebook 04: the centralized task-arithmetic baseline at the default sparsity and R, every seed,
    with notebook 01's batch, epochs and warm-up, its chosen scheduler and that scheduler's weight
    decay, and its own lr under the frozen head (`sparse_central_lr`, searched on validation: the
    argument for `sparse_lr` holds here too). It differs from 01's runs in what fine-tuning under the
    frozen head brings: the step-0 head, the mask, the gradient clipping and the lr."""
    spec = finetune_spec(
        params, mask_rule="least_sensitive", sparsity=sparsity, calibration_rounds=calibration_rounds
    )
    base = replace(
        central_config(**params),
        scheduler=check_choice("central_scheduler", central_scheduler, SCHEDULERS),
        lr=check_float("sparse_central_lr", sparse_central_lr, 0.0, None, low_open=True),
        weight_decay=check_float("central_weight_decay", central_weight_decay, 0.0, None),
        finetune=spec,
    )
    return [replace(base, seed=s) for s in check_seeds(seeds)]


def sparse_central_search_configs(
    sparse_central_search_lrs, search_epochs, *, search_seed: int = 0, **params
) -> list[CentralizedConfig]:
    """Notebook 04: the centralized sparse baseline's lr under the frozen head, judged on validation:
    its run (the default setting) at each of `sparse_central_search_lrs`, `search_epochs` long, one seed."""
    lrs = check_float_list("sparse_central_search_lrs", sparse_central_search_lrs, 0.0, None, low_open=True)
    epochs = check_int("search_epochs", search_epochs, minimum=1)
    seed = check_int("search_seed", search_seed, minimum=0)
    set_lr = params.get("sparse_central_lr")
    stand_in = 1.0 if set_lr is None else set_lr  # a set value is checked too
    first = sparse_central_configs(**{**params, "sparse_central_lr": stand_in})[0]
    return [replace(shortened(first, epochs, seed), lr=lr) for lr in lrs]


def mask_rule_configs(
    seeds,
    rules,
    rule_sparsities,
    rule_calibration_rounds,
    *,
    sparse_classes_per_client,
    local_steps,
    rounds,
    sparse_lr,
    **params,
) -> list[FedAvgConfig]:
    """Notebook 05: every mask rule at each sparsity, iid and non-iid, every seed, at 04's sparse_lr
    (FedAvg's lr is not used here)."""
    seeds = check_seeds(seeds)
    rules = check_choice_list("rules", rules, RULES)
    sparsities = check_float_list("rule_sparsities", rule_sparsities, 0.0, 1.0, high_open=True)
    check_int("rule_calibration_rounds", rule_calibration_rounds, minimum=1)
    lr = check_float("sparse_lr", sparse_lr, 0.0, None, low_open=True)
    base = replace(fedavg_base(**{**params, "lr": lr}), local_steps=local_steps, rounds=rounds)
    return [
        replace(
            base,
            seed=s,
            **sharding,
            finetune=finetune_spec(
                params, mask_rule=rule, sparsity=sp, calibration_rounds=rule_calibration_rounds
            ),
        )
        for sharding in _fl_shardings(sparse_classes_per_client)
        for sp in sparsities
        for rule in rules
        for s in seeds
    ]


# --------------------------------------------------------------------------- notebook 06

# What each method of notebook 06 changes in FedAvg (the dict remedy_methods returns).
REMEDY_METHODS = ("fedavg", "fedavgm", "fedprox", "ties", "fisher", "sparse", "scaffold")
REFERENCE_METHODS = ("fedavg", "sparse")  # the methods that also run on iid shards: notebook 04's runs


def remedy_methods(
    *,
    local_steps,
    rounds,
    sparse_lr,
    sparsity,
    calibration_rounds,
    fedavgm_server_lr,
    fedavgm_server_momentum,
    prox_mu,
    ties_density,
    ties_server_lr,
    **params,
) -> dict[str, FedAvgConfig]:
    """Notebook 06's methods at 04's rounds and J, before seed and sharding: FedAvg and sparse FedAvg are
    04's runs (its plain FedAvg, and its default sparse setting at sparse_lr); FedAvgM, FedProx, TIES and
    the Fisher merge change dense FedAvg; SCAFFOLD runs sparse, where its control variates fit."""
    fedavg, under_head = fl_bases(params, local_steps, rounds, sparse_lr)
    spec = finetune_spec(
        params, mask_rule="least_sensitive", sparsity=sparsity, calibration_rounds=calibration_rounds
    )
    sparse = replace(under_head, finetune=spec)
    momentum = check_float("fedavgm_server_momentum", fedavgm_server_momentum, 0.0, 1.0, high_open=True)
    return {
        "fedavg": fedavg,
        "fedavgm": replace(
            fedavg,
            server_lr=check_float("fedavgm_server_lr", fedavgm_server_lr, 0.0, None, low_open=True),
            server_momentum=momentum,
        ),
        "fedprox": replace(fedavg, algorithm="fedprox", prox_mu=prox_mu),
        "scaffold": replace(sparse, algorithm="scaffold"),
        "sparse": sparse,
        "ties": replace(
            fedavg,
            merge_rule="ties",
            ties_density=ties_density,
            server_lr=check_float("ties_server_lr", ties_server_lr, 0.0, None, low_open=True),
        ),
        "fisher": replace(fedavg, merge_rule="fisher"),
    }


def remedy_configs(seeds, remedy_classes_per_client, methods, **params) -> list[FedAvgConfig]:
    """Notebook 06: every method on each non-iid N_c, every seed; on iid shards the reference, FedAvg and
    sparse FedAvg (REFERENCE_METHODS: 04's runs, read back, not trained again)."""
    seeds = check_seeds(seeds)
    grid_nc = check_int_list("remedy_classes_per_client", remedy_classes_per_client, minimum=1)
    methods = check_choice_list("methods", methods, REMEDY_METHODS)
    configs = remedy_methods(**params)
    non_iid = [{"sharding": "non_iid", "classes_per_client": nc} for nc in grid_nc]
    references = [m for m in methods if m in REFERENCE_METHODS]
    runs = [(m, {"sharding": "iid"}) for m in references] + [(m, s) for s in non_iid for m in methods]
    grid = [replace(configs[m], seed=seed, **sharding) for m, sharding in runs for seed in seeds]
    return list(dict.fromkeys(grid))  # FedAvgM at server lr 1 and momentum 0 is FedAvg: one run


def remedy_search_base(
    remedy_classes_per_client, remedy_search_rounds, local_steps, *, search_seed: int = 0, **params
) -> FedAvgConfig:
    """What notebook 06's searches vary: dense FedAvg on the first non-iid N_c, one seed, fewer rounds,
    judged on validation."""
    nc = check_int_list("remedy_classes_per_client", remedy_classes_per_client, minimum=1)[0]
    return replace(
        fedavg_base(**params),
        sharding="non_iid",
        classes_per_client=nc,
        local_steps=local_steps,
        rounds=check_int("remedy_search_rounds", remedy_search_rounds, minimum=1),
        seed=check_int("search_seed", search_seed, minimum=0),
        evaluate_test=False,
    )


def fedavgm_search_configs(fedavgm_search_server_lrs, fedavgm_search_server_momentums, **params) -> list:
    """Notebook 06: FedAvgM's server lr x server momentum grid (remedy_search_base)."""
    lrs = check_float_list("fedavgm_search_server_lrs", fedavgm_search_server_lrs, 0.0, None, low_open=True)
    name = "fedavgm_search_server_momentums"
    momentums = check_float_list(name, fedavgm_search_server_momentums, 0.0, 1.0, high_open=True)
    base = remedy_search_base(**params)
    return [replace(base, server_lr=lr, server_momentum=beta) for lr in lrs for beta in momentums]


def fedprox_search_configs(fedprox_search_mus, **params) -> list:
    """Notebook 06: FedProx at each mu (remedy_search_base)."""
    mus = check_float_list("fedprox_search_mus", fedprox_search_mus, 0.0, None)
    base = remedy_search_base(**params)
    return [replace(base, algorithm="fedprox", prox_mu=mu) for mu in mus]


def ties_search_configs(ties_search_densities, ties_search_server_lrs, **params) -> list:
    """Notebook 06: TIES's density p x its step lambda, the server lr (remedy_search_base)."""
    densities = check_float_list("ties_search_densities", ties_search_densities, 0.0, 1.0, low_open=True)
    lrs = check_float_list("ties_search_server_lrs", ties_search_server_lrs, 0.0, None, low_open=True)
    base = replace(remedy_search_base(**params), merge_rule="ties")
    return [replace(base, ties_density=p, server_lr=lr) for p in densities for lr in lrs]


# --------------------------------------------------------------------------- running a grid


def check_against_data(configs: list, data) -> None:
    """Fail before any training if a config cannot run on `data` (dataset name, impossible shards)."""
    checked = set()
    for config in configs:
        if config.dataset != data.name:
            raise ConfigError(f"dataset={config.dataset!r} in a config, but the loaded data is {data.name!r}")
        fed = isinstance(config, FedAvgConfig)
        key = (config.sharding_name(), config.num_clients, config.seed) if fed else None
        if key is not None and key not in checked:
            config.shards(data)  # raises for impossible requests
            checked.add(key)


def run_grid(
    runner, ws, data, experiment: str, *, configs: list, params: dict, wait: bool = True
) -> list[RunResult]:
    """Check every config against the data first, record the grid as `experiment`, then run (or resume,
    or read back) each run in order.

    The record (runs.record_grid) is what every table of `experiment` reads: its runs, found in the
    run store by identity (a run another notebook already made is read back, not trained again).
    `params` are the notebook's parameters: eval_batch_size and checkpoint_every come from them, and
    `worker` ('I/N'): then only this worker's share runs (team.run_share); `wait` (for a stage whose
    results a later stage needs) waits for the other shares, else the complete results are returned.
    """
    check_against_data(configs, data)
    head_only = runner is run_head_only
    runs = [(head_only_run if head_only else run_folder)(ws, c) for c in configs]
    left_out = record_grid(ws.root, experiment, runs, params)
    if left_out:
        print(
            f"{len(left_out)} complete runs of an earlier {experiment} grid are not part of this grid and "
            "are left out of its tables",
            flush=True,
        )
    print(f"{len(configs)} runs", flush=True)
    options = {k: params[k] for k in RUN_OPTIONS if k in params}

    def run_one(i: int) -> RunResult:
        """The run, or, while another process holds it (a run two notebooks share), tries again until it is
        complete (read back) or its lock is free or stale (taken over), for at most wait_limit seconds."""
        deadline = time.monotonic() + params.get("wait_limit", 3600)
        while True:
            try:
                return runner(ws, data, configs[i], **options)
            except RunLockedError as locked:
                if time.monotonic() > deadline:
                    raise team.WaitTimeout(
                        f"gave up after waiting {params.get('wait_limit', 3600):g} s (wait_limit): {locked}"
                    ) from None
                print(f"waiting for {runs[i].dir.name}, which another process holds", flush=True)
                time.sleep(team.WAIT_POLL)

    if team.parse_worker(params.get("worker")) is None:
        return [run_one(i) for i in range(len(configs))]
    costs = [sum(team.run_work(c, params, head_only)[k] for k in ("train", "eval")) for c in configs]
    return team.run_share(run_one, runs, costs, params, wait=wait, experiment=experiment)


def head_only_run(ws, config: FedAvgConfig):
    """The run of `config`'s step-0 head alone: rounds, J and the lr schedule play no part."""
    identity = {
        k: v for k, v in config.to_dict().items() if k not in ("rounds", "local_steps", "lr_schedule")
    }
    return ws.run(f"{config.sharding_name()}-{config.finetune.head}-s{config.seed}", identity)


def run_head_only(ws, data, config: FedAvgConfig, **options) -> RunResult:
    """Step 0 alone: the federated frozen head of `config`'s shards, evaluated with no fine-tuning.

    The same preparation as a FedAvg run of this config (same shards, same cached head), so it is
    the "round 0" of the sparse runs. options: those of training.train_or_read; it has no rounds, so
    the checkpoint options are only checked.
    """
    if config.finetune.head == "train":
        raise ConfigError("run_head_only needs a fitted head: finetune.head must be 'ridge'")
    data.check_is(config.dataset)
    shards = config.shards(data)

    def start_training(run, eval_batch_size: int) -> HeadOnlyRun:
        return HeadOnlyRun(ws, data, config, run, shards=shards, eval_batch_size=eval_batch_size)

    return train_or_read(head_only_run(ws, config), start_training, **options)


class HeadOnlyRun(FedAvgRun):
    """A FedAvg run that stops after its preparation: no rounds, one evaluation ("round 0")."""

    label = "step-0 head"

    def __init__(self, *args, **kwargs):
        self.started = time.perf_counter()  # the preparation counts in its wall time
        super().__init__(*args, **kwargs)

    def units(self) -> int:
        return 0

    def finish(self, save_weights: bool) -> RunResult:
        self.rows = [{"round": 0, **self.evaluate(last=True)}]
        self.timing = [{"round": 0, "wall_s": time.perf_counter() - self.started}]
        return super().finish(save_weights)


# --------------------------------------------------------------------------- every grid of a notebook


@dataclass(frozen=True)
class Experiment:
    """One grid a notebook runs. group: its label in the dry-run's tables; configs: the function that
    builds its run configs from the notebook's parameters; runner: the function that trains (or reads
    back) one run; search: for a search, the regime of SEARCHED whose choice it stores (None: not a
    search); wait: in worker mode, wait for the other workers' shares before the next cell (a search
    always waits: the cells after it use its choice)."""

    group: str
    configs: Callable
    runner: Callable = run_fedavg
    search: str | None = None
    wait: bool = False


EXPERIMENTS = {
    LR_SEARCH: Experiment("lr search", search_configs, run_centralized, search="per_scheduler"),
    CENTRALIZED: Experiment("schedulers", scheduler_configs, run_centralized, search="central"),
    FEDAVG_LR_SEARCH: Experiment("lr search", fedavg_search_configs, search="fedavg"),
    FEDAVG_IID: Experiment("FedAvg iid", fedavg_iid_configs),
    HETEROGENEITY: Experiment("heterogeneity grid", heterogeneity_configs),
    HEAD_ONLY: Experiment("head only", head_only_configs, run_head_only, wait=True),
    SPARSE_LR_SEARCH: Experiment("lr search", sparse_search_configs, search="sparse"),
    SPARSE_FL: Experiment("sparse FedAvg grid", sparse_fl_configs),
    SPARSE_CENTRAL_LR_SEARCH: Experiment(
        "centralized lr search", sparse_central_search_configs, run_centralized, search="sparse_central"
    ),
    SPARSE_CENTRAL: Experiment("centralized sparse", sparse_central_configs, run_centralized),
    MASK_RULES: Experiment("mask rules", mask_rule_configs),
    FEDAVGM_SEARCH: Experiment("server step search", fedavgm_search_configs, search="fedavgm"),
    FEDPROX_SEARCH: Experiment("mu search", fedprox_search_configs, search="fedprox"),
    TIES_SEARCH: Experiment("TIES search", ties_search_configs, search="ties"),
    REMEDIES: Experiment("remedies", remedy_configs),
}
# Notebook -> its experiments, in the order it runs them (pipeline --dry-run counts the same grids).
NOTEBOOK_EXPERIMENTS = {
    "01": [LR_SEARCH, CENTRALIZED],
    "02": [FEDAVG_LR_SEARCH, FEDAVG_IID],
    "03": [HETEROGENEITY],
    "04": [HEAD_ONLY, SPARSE_LR_SEARCH, SPARSE_FL, SPARSE_CENTRAL_LR_SEARCH, SPARSE_CENTRAL],
    "05": [MASK_RULES],
    "06": [FEDAVGM_SEARCH, FEDPROX_SEARCH, TIES_SEARCH, REMEDIES],
}
# What a value chosen by a search stands in for until the search has run (any value costs the same and
# passes the same checks).
STAND_INS = {
    "lr": 0.01,
    "weight_decay": 0.0,
    "scheduler_hparams": {scheduler: {"lr": 0.01, "weight_decay": 0.0} for scheduler in SCHEDULERS},
    "central_scheduler": "cosine",
    "central_weight_decay": 0.0,
    "sparse_lr": 0.01,
    "sparse_central_lr": 0.01,
    "fedavgm_server_lr": 1.0,
    "fedavgm_server_momentum": 0.5,
    "prox_mu": 0.01,
    "ties_density": 0.2,
    "ties_server_lr": 1.0,
}


def with_stand_ins(params: dict) -> dict:
    """`params` where a value its notebook's searches choose is None (or absent): its stand-in."""
    missing = {name: value for name, value in STAND_INS.items() if params.get(name) is None}
    return {**params, **missing}


def notebook_grids(key: str, params: dict) -> list[dict]:
    """Every grid notebook `key` runs, built from its parameters (stand-ins for what its own searches
    choose): dicts of group, function, experiment and configs. Building them checks every parameter."""
    params = with_stand_ins(params)
    grids = []
    for experiment in NOTEBOOK_EXPERIMENTS.get(key, []):
        function = EXPERIMENTS[experiment].configs
        configs = function(**params)
        group = EXPERIMENTS[experiment].group
        grids.append({"group": group, "function": function, "experiment": experiment, "configs": configs})
    return grids


def check_notebook(key: str, params: dict) -> list[dict]:
    """Check all of notebook `key`'s parameters before its first run; returns its grids (notebook_grids)."""
    options = {name: params[name] for name in RUN_OPTIONS if name in params}
    check_run_options(**options)
    return notebook_grids(key, params)


# --------------------------------------------------------------------------- a notebook's cells


# Columns grid_table shows even when every run shares their value (the others: only when they vary).
GRID_TABLE_FIELDS = ("epochs", "rounds", "local_steps", "lr", "weight_decay")


def grid_configs(experiment: str, params: dict) -> list:
    """The configs of `experiment`, in run order, built from a notebook's parameters by its function
    (Experiment.configs, the function pipeline --dry-run counts)."""
    check_choice("experiment", experiment, EXPERIMENTS)
    return EXPERIMENTS[experiment].configs(**params)


def grid_table(experiment: str, params: dict) -> pd.DataFrame:
    """The runs `run(ws, data, experiment, params)` is about to make, one row per config in run order
    (index `run`, from 1): the config fields that vary across the grid, plus GRID_TABLE_FIELDS (what
    every run shares: its length and lr). Fine-tuning fields lose their `finetune.` prefix; a field a
    run does not have (the mask of a dense run) is empty."""
    configs = grid_configs(experiment, params)
    table = pd.json_normalize([config.to_dict() for config in configs])
    table.columns = [name.removeprefix("finetune.") for name in table.columns]
    table = table[grid_table_columns(table)].convert_dtypes()  # integers stay integers beside an empty cell
    table.index = pd.RangeIndex(1, len(table) + 1, name="run")
    return table


def grid_table_columns(table: pd.DataFrame) -> list[str]:
    """The columns grid_table shows: GRID_TABLE_FIELDS, and every column whose value differs between
    runs, except one with a single value that is empty exactly where a column already shown is (the
    calibration details of the sparse runs, once mask_rule shows which runs are sparse)."""
    shown, patterns = [], set()
    for name in table.columns:
        column = table[name]
        pattern = tuple(column.isna())
        varies = column.nunique(dropna=False) > 1
        repeats = column.nunique() == 1 and pattern in patterns
        if name in GRID_TABLE_FIELDS or (varies and not repeats):
            shown.append(name)
            patterns.add(pattern)
    return shown


def run(ws, data, experiment: str, params: dict) -> None:
    """Run `experiment` (a key of EXPERIMENTS, e.g. CENTRALIZED) from the notebook's parameters: its
    configs (grid_configs, as grid_table shows them), its runner and wait policy (EXPERIMENTS), then
    run_grid; tables and figures read what it records.

    A search (an Experiment with `search`: the lr searches, and notebook 01's scheduler comparison,
    which chooses the scheduler notebook 04 uses) goes through run_search, which stores its choice in
    hparams.json for later notebooks; the cells after it see the choice because `params` is updated in
    place: each parameter it searched (SEARCHED) that is None, or absent, takes the chosen value
    (with_choice); a value set in the parameters cell stays."""
    configs = grid_configs(experiment, params)
    how = EXPERIMENTS[experiment]
    if how.search is None:
        run_grid(how.runner, ws, data, experiment, configs=configs, params=params, wait=how.wait)
        return
    used = run_search(how.runner, ws, data, experiment, configs=configs, params=params, regime=how.search)
    params.update(used)
