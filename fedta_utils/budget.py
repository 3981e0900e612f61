"""The study's cost before running it: `python -m fedta_utils.pipeline --profile full --dry-run`.

For every notebook the runs are built by the same functions the notebook
calls (experiments.py), from the notebook's own defaults plus the profile and
-p overrides, so the count is what will run. Each run's work is counted in
images (trained, evaluated, passed through the backbone for step 0) and
per-sample Fisher gradients; a short calibration on this device measures the
seconds each of those costs, and the product gives the estimated hours.
Ridge/probe heads shared through the cache are counted once.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import pandas as pd

from .checks import ConfigError
from .federated import FedAvgConfig
from .pipeline import declared_parameters, discover_notebooks, select_notebooks
from .profiles import profile_values
from .training import CentralizedConfig

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
PLACEHOLDER_LR, PLACEHOLDER_WD = 0.01, 0.0  # the search's choice is unknown before notebook 01 runs


@dataclass
class Work:
    """Images and samples a group of runs processes."""

    runs: int = 0
    train_images: float = 0.0
    eval_images: float = 0.0
    fisher_samples: float = 0.0
    head_keys: set = field(default_factory=set)  # step-0 heads; runs that share one reuse the cached head


def split_sizes(params: dict) -> tuple[int, int, int]:
    """(train, val, test) image counts implied by the notebook's data parameters."""
    if params.get("dataset", "cifar100") == "cifar100":
        full, test = CIFAR_TRAIN, CIFAR_TEST
    else:
        full, test = params.get("synthetic_train_size", CIFAR_TRAIN), params.get("synthetic_test_size", CIFAR_TEST)
    val = round(full * params.get("val_fraction", 0.1))
    return full - val, val, test


def add_run(work: Work, config, sizes: tuple[int, int, int], head_only: bool = False) -> None:
    """Add the images and Fisher samples one run processes to `work`."""
    train, val, test = sizes
    eval_split = val + (test if config.evaluate_test else 0)
    spec = config.finetune
    work.runs += 1
    if spec.head != "train":
        sharding = config.sharding_name() if isinstance(config, FedAvgConfig) else "centralized"
        work.head_keys.add((sharding, config.seed, spec.head))
    if spec.is_sparse and spec.mask_rule in ("least_sensitive", "most_sensitive"):
        work.fisher_samples += spec.calibration_rounds * spec.calibration_samples
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


def notebook_plans(key: str, params: dict) -> list[tuple[str, list]]:
    """(label, configs) groups that notebook `key` runs with `params`."""
    from . import experiments as ex

    params = dict(params)
    if params.get("lr") is None:
        params["lr"] = PLACEHOLDER_LR
    if params.get("weight_decay") is None:
        params["weight_decay"] = PLACEHOLDER_WD
    if key == "01":
        return [("lr search", ex.search_configs(**params)),
                ("schedulers", ex.scheduler_configs(**params))]
    if key == "02":
        return [("FedAvg iid", ex.fedavg_iid_configs(**params))]
    if key == "03":
        return [("heterogeneity grid", ex.heterogeneity_configs(**params))]
    if key == "04":
        return [("head only", ex.head_only_configs(**params)),
                ("sparse FedAvg grid", ex.sparse_fl_configs(**params)),
                ("centralized sparse", ex.sparse_central_configs(**params))]
    if key == "05":
        return [("mask rules", ex.mask_rule_configs(**params))]
    return []


def notebook_defaults(path) -> dict:
    """The parameters cell's values, as Python objects."""
    values = {}
    for name, info in declared_parameters(path).items():
        try:
            values[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path.name}: the default of {name} ({info['default']}) is not a literal") from None
    return values


def estimate(profile: str, only: list[str] | None, overrides: dict, unit_seconds: dict) -> pd.DataFrame:
    """One row per notebook group: runs, images, and estimated hours from `unit_seconds`."""
    rows = []
    for key, path in select_notebooks(only, discover_notebooks()).items():
        params = notebook_defaults(path)
        params.update({k: v for k, v in profile_values(profile).items() if k in params})
        params.update({k: v for k, v in overrides.items() if k in params})
        sizes = split_sizes(params)
        for label, configs in notebook_plans(key, params):
            work = Work()
            for config in configs:
                add_run(work, config, sizes, head_only=label == "head only")
            feature_images = len(work.head_keys) * sizes[0]  # one backbone pass over the train split per head
            seconds = (work.train_images * unit_seconds["train"] + (work.eval_images + feature_images)
                       * unit_seconds["eval"] + work.fisher_samples * unit_seconds["fisher"])
            rows.append({"notebook": path.stem, "group": label, "runs": work.runs,
                         "train_images_M": work.train_images / 1e6, "eval_images_M": work.eval_images / 1e6,
                         "fisher_samples_k": work.fisher_samples / 1e3, "hours": seconds / 3600})
    return pd.DataFrame(rows)


def measure_unit_seconds(model: str, device: str = "auto") -> tuple[dict, str]:
    """Seconds per trained image, evaluated image and Fisher sample on this device (short runs)."""
    from .bench import default_settings, describe, measure_evaluation, measure_fisher, measure_train_step

    settings = default_settings(model, device, batch_size=32, quick=True)
    settings.steps, settings.repeats = 3, 2
    train = measure_train_step(settings) / settings.batch_size
    evaluation = measure_evaluation(settings)
    fisher = measure_fisher(settings, "hooks")
    return {"train": train, "eval": evaluation, "fisher": fisher}, describe(settings)


def print_budget(profile: str, only: list[str] | None, overrides: dict) -> pd.DataFrame:
    """Measure this device, then print runs and estimated hours per notebook and in total."""
    model = overrides.get("model") or ("tiny_vit" if profile == "smoke" else "dino_vits16")
    unit_seconds, device = measure_unit_seconds(model)
    table = estimate(profile, only, overrides, unit_seconds)
    print(f"Estimated cost of the '{profile}' profile, measured on: {device}")
    print(f"seconds per trained image {unit_seconds['train']:.2e}, per evaluated image {unit_seconds['eval']:.2e}, "
          f"per Fisher sample {unit_seconds['fisher']:.2e}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    total = table["hours"].sum()
    print(f"total: {int(table['runs'].sum())} runs, {total:,.1f} hours on this device"
          + ("" if math.isfinite(total) else " (could not estimate)"))
    return table
