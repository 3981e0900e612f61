"""The study's cost before running it: `python -m fedta_utils.pipeline --profile full --dry-run`.

For every notebook the runs are built by the same functions the notebook
calls (experiments.py, listed in NOTEBOOK_GRIDS), from the notebook's own
defaults plus the profile and -p overrides, so the count is what will run.
Each run's work is counted in images (trained, evaluated, passed through the
backbone to fit a step-0 head) and per-sample Fisher gradients; a short
calibration on this device measures the seconds each of those costs, and the
product gives the estimated hours. Step-0 heads that runs share through the
head cache are counted once, where the notebooks first fit them.

The estimate leaves out what costs little next to training on a GPU: FedAvg's
per-round overhead (within 10 %, see `python -m fedta_utils.bench`), writing
checkpoints, loading the data. Trained images are costed at batch 32 (FedAvg's
B); the centralized runs' batch of 128 is usually a little cheaper per image.
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass, field

import pandas as pd

from .checks import ConfigError
from .federated import FedAvgConfig
from .pipeline import check_overrides, declared_parameters, discover_notebooks, select_notebooks
from .profiles import profile_values
from .training import CentralizedConfig

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
PLACEHOLDER_LR, PLACEHOLDER_WD = 0.01, 0.0  # the search's choice is unknown before notebook 01 runs

# Notebook -> (group label, experiments.<function>) in the order the notebook runs them.
NOTEBOOK_GRIDS = {
    "01": [("lr search", "search_configs"), ("schedulers", "scheduler_configs")],
    "02": [("FedAvg iid", "fedavg_iid_configs")],
    "03": [("heterogeneity grid", "heterogeneity_configs")],
    "04": [("head only", "head_only_configs"), ("sparse FedAvg grid", "sparse_fl_configs"),
           ("centralized sparse", "sparse_central_configs")],
    "05": [("mask rules", "mask_rule_configs")],
}
HEAD_ONLY_FUNCTION = "head_only_configs"  # its runs only fit the head and evaluate once
FISHER_RULES = ("least_sensitive", "most_sensitive")
# The calibration: a few steps, so the dry-run takes seconds on a GPU and stays near a minute on a
# CPU with ViT-S/16 at 224 (where one training step of 32 images takes seconds).
CALIBRATION = dict(batch_size=32, steps=5, repeats=2, eval_images=512, fisher_samples=32)
CALIBRATION_SLOW = dict(batch_size=32, steps=1, repeats=1, eval_images=64, fisher_samples=8)


@dataclass
class Work:
    """Images and samples a group of runs processes."""

    runs: int = 0
    train_images: float = 0.0
    eval_images: float = 0.0
    feature_images: float = 0.0   # backbone passes to fit step-0 heads
    fisher_samples: float = 0.0


@dataclass
class Plan:
    """The runs of one notebook group, with the work they do."""

    notebook: str
    group: str
    configs: list
    work: Work = field(default_factory=Work)


def split_sizes(params: dict) -> tuple[int, int, int]:
    """(train, val, test) image counts implied by the notebook's data parameters."""
    if params.get("dataset", "cifar100") == "cifar100":
        full, test = CIFAR_TRAIN, CIFAR_TEST
    else:
        full, test = params.get("synthetic_train_size", CIFAR_TRAIN), params.get("synthetic_test_size", CIFAR_TEST)
    val = round(full * params.get("val_fraction", 0.1))
    return full - val, val, test


def head_key(config) -> tuple | None:
    """What a cached step-0 head depends on (as sparse.head_cache_path), or None for a trained head."""
    spec = config.finetune
    if spec.head == "train":
        return None
    head = tuple((k, v) for k, v in spec.identity().items() if k.startswith(("head", "ridge", "probe")))
    if isinstance(config, FedAvgConfig):
        shards = (config.sharding_name(), config.num_clients, config.participation, config.seed)
    else:
        shards = ("centralized", config.seed)
    return (config.model, config.dataset, shards, head)


def fisher_samples(config) -> int:
    """Per-sample Fisher gradients a run computes to calibrate its mask (0 for other rules)."""
    spec = config.finetune
    if not spec.is_sparse or spec.mask_rule not in FISHER_RULES or spec.sparsity == 0:
        return 0
    if isinstance(config, FedAvgConfig):  # every client scores an equal share, rounded up
        per_round = config.num_clients * -(-spec.calibration_samples // config.num_clients)
    else:
        per_round = spec.calibration_samples
    return spec.calibration_rounds * per_round


def add_run(work: Work, config, sizes: tuple[int, int, int], heads_seen: set, head_only: bool = False) -> None:
    """Add the images and Fisher samples one run processes to `work`."""
    train, val, test = sizes
    eval_split = val + (test if config.evaluate_test else 0)
    work.runs += 1
    key = head_key(config)
    if key is not None and key not in heads_seen:
        heads_seen.add(key)
        work.feature_images += train  # one backbone pass over the train split, summed over the clients
    work.fisher_samples += fisher_samples(config)
    if head_only:
        work.eval_images += eval_split
    elif isinstance(config, CentralizedConfig):
        work.train_images += config.epochs * train
        work.eval_images += config.epochs * eval_split
    else:
        shard = train / config.num_clients
        work.train_images += (config.rounds * config.clients_per_round * config.local_steps
                              * min(config.batch_size, shard))
        evaluations = config.rounds // config.eval_every + (config.rounds % config.eval_every != 0)
        work.eval_images += evaluations * eval_split


def notebook_defaults(path) -> dict:
    """The parameters cell's values, as Python objects."""
    values = {}
    for name, info in declared_parameters(path).items():
        try:
            values[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path.name}: the default of {name} ({info['default']}) is not a literal") from None
    return values


def notebook_values(path, profile: str, overrides: dict) -> dict:
    """What the notebook sees: its defaults, then the profile's values, then -p overrides."""
    params = notebook_defaults(path)
    params.update({k: v for k, v in profile_values(profile).items() if k in params})
    params.update({k: v for k, v in overrides.items() if k in params})
    if params.get("lr") is None:
        params["lr"] = PLACEHOLDER_LR
    if params.get("weight_decay") is None:
        params["weight_decay"] = PLACEHOLDER_WD
    return params


def build_plans(profile: str, only: list[str] | None, overrides: dict) -> list[Plan]:
    """Every group of runs the selected notebooks execute, with their work; validates all input first."""
    from . import experiments

    selected = select_notebooks(only, discover_notebooks())
    check_overrides(overrides, selected)
    plans, heads_seen = [], set()
    for key, path in selected.items():
        params = notebook_values(path, profile, overrides)
        sizes = split_sizes(params)
        for group, function in NOTEBOOK_GRIDS.get(key, []):
            plan = Plan(path.stem, group, getattr(experiments, function)(**params))
            for config in plan.configs:
                add_run(plan.work, config, sizes, heads_seen, head_only=function == HEAD_ONLY_FUNCTION)
            plans.append(plan)
        if key not in NOTEBOOK_GRIDS:
            plans.append(Plan(path.stem, "(no training runs)", []))
    return plans


def estimate(plans: list[Plan], unit_seconds: dict) -> pd.DataFrame:
    """One row per group: runs, work, and estimated hours (training, evaluation, Fisher, total)."""
    rows = []
    for plan in plans:
        w = plan.work
        train_h = w.train_images * unit_seconds["train"] / 3600
        eval_h = (w.eval_images + w.feature_images) * unit_seconds["eval"] / 3600
        fisher_h = w.fisher_samples * unit_seconds["fisher"] / 3600
        rows.append({"notebook": plan.notebook, "group": plan.group, "runs": w.runs,
                     "train_images_M": w.train_images / 1e6, "eval_images_M": (w.eval_images + w.feature_images) / 1e6,
                     "fisher_samples_k": w.fisher_samples / 1e3, "train_h": train_h, "eval_h": eval_h,
                     "fisher_h": fisher_h, "hours": train_h + eval_h + fisher_h})
    return pd.DataFrame(rows)


def per_notebook(table: pd.DataFrame) -> pd.DataFrame:
    """Runs and hours per notebook, plus a total row."""
    sums = table.groupby("notebook", sort=False)[["runs", "train_h", "eval_h", "fisher_h", "hours"]].sum()
    sums.loc["total"] = sums.sum()
    sums["runs"] = sums["runs"].astype(int)
    return sums.reset_index()


def measure_unit_seconds(model: str, precision: str = "auto", eval_batch_size: int = 256,
                         device: str = "auto") -> tuple[dict, str, str]:
    """Seconds per trained image, evaluated image and Fisher sample on this device (a short calibration).

    Returns (unit seconds, description of the setup, 'CPU' or 'GPU').
    """
    from . import models
    from .bench import (default_settings, describe, measure_evaluation, measure_fisher, measure_train_step,
                        setup_columns)

    settings = default_settings(model, device, batch_size=CALIBRATION["batch_size"], quick=True,
                                precision=precision, eval_batch_size=eval_batch_size)
    slow = settings.device.type == "cpu" and models.input_size(model) >= 224
    plan = CALIBRATION_SLOW if slow else CALIBRATION
    settings.steps, settings.repeats = plan["steps"], plan["repeats"]
    settings.eval_images, settings.fisher_samples = plan["eval_images"], plan["fisher_samples"]
    settings.eval_batch_size = min(eval_batch_size, plan["eval_images"])
    columns = setup_columns(settings)  # how busy the CPUs are before the calibration loads them
    unit = {"train": measure_train_step(settings) / settings.batch_size,
            "eval": measure_evaluation(settings),
            "fisher": measure_fisher(settings, "hooks")}
    return unit, describe(settings, columns), "GPU" if settings.device.type == "cuda" else "CPU"


def single_value(plans: list[Plan], name: str):
    """The one value of config field `name` across all runs (the calibration measures one setting)."""
    values = sorted({getattr(config, name) for plan in plans for config in plan.configs})
    if len(values) != 1:
        raise ConfigError(f"the selected notebooks use {name} {values}; estimate one {name} at a time (--only)")
    return values[0]


def _number(value: float) -> str:
    """Thousands separators for big figures, three decimals for small ones (a smoke run's hours)."""
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"


def print_budget(profile: str, only: list[str] | None, overrides: dict) -> pd.DataFrame:
    """Count the runs, calibrate this device, then print runs and estimated hours per notebook and in total."""
    plans = build_plans(profile, only, overrides)  # bad input stops here, before any compute
    if not any(plan.configs for plan in plans):
        print(f"The selected notebooks ({', '.join(plan.notebook for plan in plans)}) train nothing: 0 runs.")
        return estimate(plans, {"train": 0.0, "eval": 0.0, "fisher": 0.0})
    eval_batch_size = max(notebook_values(path, profile, overrides).get("eval_batch_size", 256)
                          for path in select_notebooks(only, discover_notebooks()).values())
    started = time.perf_counter()
    unit_seconds, setup, kind = measure_unit_seconds(single_value(plans, "model"), single_value(plans, "precision"),
                                                     eval_batch_size)
    calibration_s = time.perf_counter() - started
    table = estimate(plans, unit_seconds)
    print(f"Estimated cost of the '{profile}' profile in {kind}-hours on this machine: {setup}")
    print(f"calibration ({calibration_s:.0f} s): seconds per trained image {unit_seconds['train']:.2e}, "
          f"per evaluated image {unit_seconds['eval']:.2e}, per Fisher sample {unit_seconds['fisher']:.2e}")
    print(table.to_string(index=False, float_format=_number))
    print()
    totals = per_notebook(table)
    print(totals.to_string(index=False, float_format=_number))
    total = totals["hours"].iloc[-1]
    print(f"total: {int(totals['runs'].iloc[-1])} runs, {_number(total)} {kind}-hours on this machine"
          + ("" if math.isfinite(total) else " (could not estimate)"))
    return table
