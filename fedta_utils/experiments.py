"""The grids each notebook runs, and the run of notebook 04's step-0 head alone.

Each `*_configs` function turns a notebook's parameters (same names as in its
parameters cell) into the list of run configs the notebook executes; NOTEBOOK_GRIDS
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

# Experiment folder names under <results_dir>/<profile>/ (read by notebook 06 and the report).
LR_SEARCH = "01_lr_search"
CENTRALIZED = "01_centralized"
FEDAVG_LR_SEARCH = "02_lr_search"
FEDAVG_IID = "02_fedavg_iid"
HETEROGENEITY = "03_heterogeneity"
SPARSE_LR_SEARCH = "04_lr_search"
SPARSE_FL = "04_sparse_fl"
SPARSE_CENTRAL = "04_sparse_centralized"
HEAD_ONLY = "04_head_only"
MASK_RULES = "05_mask_rules"
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


def search_configs(
    dataset,
    model,
    search_lrs,
    search_weight_decays,
    *,
    search_epochs,
    batch_size,
    momentum,
    warmup_epochs,
    precision,
    search_seed: int = 0,
    **later,
) -> list[CentralizedConfig]:
    """The learning-rate x weight-decay grid, cosine schedule, judged on validation only."""
    search_lrs = check_float_list("search_lrs", search_lrs, 0.0, None, low_open=True)
    search_weight_decays = check_float_list("search_weight_decays", search_weight_decays, 0.0, None)
    check_int("search_epochs", search_epochs, minimum=1)
    check_int("search_seed", search_seed, minimum=0)
    return [
        CentralizedConfig(
            dataset=dataset,
            model=model,
            seed=search_seed,
            epochs=search_epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=wd,
            scheduler="cosine",
            warmup_epochs=min(warmup_epochs, search_epochs),
            precision=precision,
            evaluate_test=False,
            **evaluation(**later),
        )
        for lr in search_lrs
        for wd in search_weight_decays
    ]


def evaluation(eval_points=10, eval_subset=1000, img_size=None, **_) -> dict:
    """The evaluation and input-size fields every config of a notebook shares."""
    return {"eval_points": eval_points, "eval_subset": eval_subset, "img_size": img_size}


def scheduler_configs(
    dataset,
    model,
    seeds,
    epochs,
    *,
    batch_size,
    lr,
    weight_decay,
    momentum,
    schedulers,
    warmup_epochs,
    precision,
    **params,
) -> list[CentralizedConfig]:
    """Every scheduler at the chosen lr / weight decay, for every seed."""
    seeds = check_seeds(seeds)
    schedulers = check_choice_list("schedulers", schedulers, SCHEDULERS)
    return [
        CentralizedConfig(
            dataset=dataset,
            model=model,
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_epochs=warmup_epochs,
            precision=precision,
            **evaluation(**params),
        )
        for scheduler in schedulers
        for seed in seeds
    ]


# Per search regime: notebook parameter -> the config field its search varies.
SEARCHED = {
    "central": {"lr": "lr", "weight_decay": "weight_decay"},
    "fedavg": {"lr": "lr", "weight_decay": "weight_decay"},
    "sparse": {"sparse_lr": "lr"},
}


def run_search(runner, ws, data, experiment: str, *, configs: list, params: dict, regime: str) -> dict:
    """A search stage (every worker's share done first); returns `params` with its choice where they
    are None (with_choice).

    The choice: the run with the highest final (full) validation accuracy, the lower lr on a tie.
    hparams.json, which the later notebooks read, records both: {regime}_search_lr (and
    _search_weight_decay, _search_val_acc) what the search chose, {regime}_lr (and _weight_decay) the
    value this notebook uses, its own where the notebook set one. Regime 'central' (notebook 01),
    'fedavg' (02) or 'sparse' (04)."""
    top = max(
        run_grid(runner, ws, data, experiment, configs=configs, params=params),
        key=lambda r: (r.summary["final_val_acc"], -r.run.config["lr"]),
    )
    params = with_choice(params, top.run.config, regime)
    record = {f"{regime}_search_val_acc": top.summary["final_val_acc"]}
    for name, field in SEARCHED[regime].items():
        record[f"{regime}_search_{field}"] = top.run.config[field]
        record[f"{regime}_{field}"] = params[name]
    ws.save_hparams(record)
    print("chosen on validation, and used:", record)
    return params


def with_choice(params: dict, chosen: dict, regime: str) -> dict:
    """`params` where the searched parameters (SEARCHED[regime]) that are None take the `chosen`
    config's values (explicit values stay)."""
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
    batch_size,
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
        batch_size=batch_size,
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


def fedavg_iid_configs(seeds, local_steps, rounds, **params) -> list[FedAvgConfig]:
    """Notebook 02: iid shards, the chosen J and rounds, every seed."""
    base = fedavg_base(**params)
    return [
        replace(base, seed=s, local_steps=local_steps, rounds=rounds, sharding="iid")
        for s in check_seeds(seeds)
    ]


def scaled_rounds(base_rounds: int, base_local_steps: int, local_steps: int) -> int:
    """Rounds for J local steps so that rounds * J stays constant (at least one round)."""
    return max(1, round(base_rounds * base_local_steps / local_steps))


def heterogeneity_configs(
    seeds, classes_per_client_grid, local_steps_grid, base_rounds, *, include_iid: bool = True, **params
) -> list[FedAvgConfig]:
    """Notebook 03: (iid + non-iid Nc) x J, rounds scaled so rounds * J is constant."""
    seeds = check_seeds(seeds)
    grid_nc = check_int_list("classes_per_client_grid", classes_per_client_grid, minimum=1)
    grid_j = check_int_list("local_steps_grid", local_steps_grid, minimum=1)
    base_rounds = check_int("base_rounds", base_rounds, minimum=1)
    base = fedavg_base(**params)
    shardings = ([{"sharding": "iid"}] if include_iid else []) + [
        {"sharding": "non_iid", "classes_per_client": nc} for nc in grid_nc
    ]
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
    base = replace(fedavg_base(**params), local_steps=local_steps, rounds=rounds)
    under_head = replace(base, lr=check_float("sparse_lr", sparse_lr, 0.0, None, low_open=True))
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


def head_only_configs(seeds, sparse_classes_per_client, **params) -> list[FedAvgConfig]:
    """Notebook 04: the step-0 head alone (no fine-tuning, so no clipping), per sharding and seed."""
    base = replace(fedavg_base(**params), rounds=1, local_steps=1)
    return [
        replace(base, seed=s, finetune=finetune_spec(params, max_grad_norm=None), **sharding)
        for sharding in _fl_shardings(sparse_classes_per_client)
        for s in check_seeds(seeds)
    ]


def sparse_central_configs(
    dataset,
    model,
    seeds,
    epochs,
    *,
    warmup_epochs,
    central_batch_size,
    central_lr,
    central_weight_decay,
    momentum,
    precision,
    sparsity,
    calibration_rounds,
    **params,
) -> list[CentralizedConfig]:
    """Notebook 04: the centralized task-arithmetic baseline at the default sparsity and R, with notebook
    01's dense schedule (same epochs, warm-up, cosine, lr and weight decay); it differs from 01's runs in
    what fine-tuning under the frozen head brings: the step-0 head, the mask and the gradient clipping."""
    check_int("central_batch_size", central_batch_size, minimum=1)
    check_float("central_lr", central_lr, 0.0, None, low_open=True)
    check_float("central_weight_decay", central_weight_decay, 0.0, None)
    spec = finetune_spec(
        params, mask_rule="least_sensitive", sparsity=sparsity, calibration_rounds=calibration_rounds
    )
    return [
        CentralizedConfig(
            dataset=dataset,
            model=model,
            seed=s,
            epochs=epochs,
            batch_size=central_batch_size,
            lr=central_lr,
            momentum=momentum,
            weight_decay=central_weight_decay,
            scheduler="cosine",
            warmup_epochs=warmup_epochs,
            precision=precision,
            finetune=spec,
            **evaluation(**params),
        )
        for s in check_seeds(seeds)
    ]


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


# --------------------------------------------------------------------------- every grid of a notebook

# Notebook -> (group label, the function that builds the grid, the experiment it records), in the order
# the notebook runs them (pipeline --dry-run counts the same grids).
NOTEBOOK_GRIDS = {
    "01": [("lr search", search_configs, LR_SEARCH), ("schedulers", scheduler_configs, CENTRALIZED)],
    "02": [
        ("lr search", fedavg_search_configs, FEDAVG_LR_SEARCH),
        ("FedAvg iid", fedavg_iid_configs, FEDAVG_IID),
    ],
    "03": [("heterogeneity grid", heterogeneity_configs, HETEROGENEITY)],
    "04": [
        ("head only", head_only_configs, HEAD_ONLY),
        ("lr search", sparse_search_configs, SPARSE_LR_SEARCH),
        ("sparse FedAvg grid", sparse_fl_configs, SPARSE_FL),
        ("centralized sparse", sparse_central_configs, SPARSE_CENTRAL),
    ],
    "05": [("mask rules", mask_rule_configs, MASK_RULES)],
}
# What a value chosen by a search of the same notebook stands in for until the search has run (any
# value costs the same and passes the same checks).
STAND_INS = {
    "lr": 0.01,
    "weight_decay": 0.0,
    "central_lr": 0.01,
    "central_weight_decay": 0.0,
    "sparse_lr": 0.01,
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
    for group, function, experiment in NOTEBOOK_GRIDS.get(key, []):
        configs = function(**params)
        grids.append({"group": group, "function": function, "experiment": experiment, "configs": configs})
    return grids


def check_notebook(key: str, params: dict) -> list[dict]:
    """Check all of notebook `key`'s parameters before its first run; returns its grids (notebook_grids)."""
    options = {name: params[name] for name in RUN_OPTIONS if name in params}
    check_run_options(**options)
    return notebook_grids(key, params)


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


# --------------------------------------------------------------------------- a notebook's cells


@dataclass(frozen=True)
class Experiment:
    """How `run` executes one experiment of NOTEBOOK_GRIDS: the function that trains (or reads back)
    one run, and for a search the regime of SEARCHED whose choice it stores (None: not a search).
    `wait`: in worker mode, wait for the other workers' shares before the next cell (a search always
    waits: the cells after it use its choice)."""

    runner: Callable
    search: str | None = None
    wait: bool = False


# Experiment -> how it runs; its configs come from its function in NOTEBOOK_GRIDS.
EXPERIMENTS = {
    LR_SEARCH: Experiment(run_centralized, search="central"),
    CENTRALIZED: Experiment(run_centralized),
    FEDAVG_LR_SEARCH: Experiment(run_fedavg, search="fedavg"),
    FEDAVG_IID: Experiment(run_fedavg),
    HETEROGENEITY: Experiment(run_fedavg),
    HEAD_ONLY: Experiment(run_head_only, wait=True),
    SPARSE_LR_SEARCH: Experiment(run_fedavg, search="sparse"),
    SPARSE_FL: Experiment(run_fedavg),
    SPARSE_CENTRAL: Experiment(run_centralized),
    MASK_RULES: Experiment(run_fedavg),
}
# Columns grid_table shows even when every run shares their value (the others: only when they vary).
GRID_TABLE_FIELDS = ("epochs", "rounds", "local_steps", "lr", "weight_decay")


def grid_configs(experiment: str, params: dict) -> list:
    """The configs of `experiment`, in run order, built from a notebook's parameters by the function
    NOTEBOOK_GRIDS names for it (the function pipeline --dry-run counts)."""
    functions = {name: function for grids in NOTEBOOK_GRIDS.values() for _, function, name in grids}
    check_choice("experiment", experiment, functions)
    return functions[experiment](**params)


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

    A search (LR_SEARCH, FEDAVG_LR_SEARCH, SPARSE_LR_SEARCH) goes through run_search, which stores its
    choice in hparams.json for later notebooks; the cells after it see the choice because `params` is
    updated in place: each parameter it searched (SEARCHED) that is None, or absent, takes the chosen
    value (with_choice); a value set in the parameters cell stays."""
    configs = grid_configs(experiment, params)
    how = EXPERIMENTS[experiment]
    if how.search is None:
        run_grid(how.runner, ws, data, experiment, configs=configs, params=params, wait=how.wait)
        return
    used = run_search(how.runner, ws, data, experiment, configs=configs, params=params, regime=how.search)
    params.update(used)
