"""Results -> tables: the loaders, statistics over seeds, the study's one selection rule, and one function
per table.

    runs = load_runs("results/full", HETEROGENEITY)       # one row per complete run
    table = heterogeneity_table("results/full")           # mean, std, n over seeds

Every function takes the results root of one profile (<results_dir>/<profile>). The experiment
notebooks call these right after their runs, and report.write_report calls the same functions. A
table function raises NoResults when its experiment has no complete run.

Model selection, the one rule of the study: a configuration's score is its validation accuracy at
the final round or epoch (summary key final_val_acc), averaged over seeds. The best configuration
(learning rate and weight decay, scheduler, sparse setting, mask rule) is the one with the highest
score, on a tie the smaller learning rate, then the first in table order, and what is reported for
it is its test accuracy (final_test_acc, mean +- std over seeds): the test set never chooses.
Tables that compare configurations keep every configuration's test accuracy and mark the chosen one
(column `chosen`).

Statistics over seeds: mean, std (ddof=1; 0 for one seed) and n, the number of runs averaged.

What a curve answers ("how many epochs", the late-round gain, accuracy at equal images) is read from
validation curves evaluated on the full validation split at every point (val_curves: the runs with
full_val_curve), never from test curves or from curves whose earlier points are on the subset.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .experiments import (
    CENTRALIZED,
    EXPERIMENTS,
    FEDAVG_IID,
    HEAD_ONLY,
    HETEROGENEITY,
    LR_SEARCH,
    MASK_RULES,
    REMEDIES,
    SEARCHED,
    SPARSE_CENTRAL,
    SPARSE_FL,
)
from .masks import RULES, jaccard, mask_density_by_parameter, unpack_masks
from .runs import grid_runs

DATA = "00_data"  # notebook 00 saves split_sizes.csv and shard_stats.csv here
DRIFT = [
    "mean_client_delta_norm",
    "avg_delta_norm",
    "mean_pairwise_cosine",
    "sign_conflict_fraction",
    "sign_agreement",
]  # logged per FedAvg round (fedavg.py)


class NoResults(LookupError):
    """An experiment (or a table of notebook 00) that a table or figure needs has no results yet."""


# --------------------------------------------------------------------------- loaders


def sharding_label(run: dict) -> str:
    """'iid', 'Nc=5' or 'Dir(0.1)'."""
    if run.get("sharding") == "non_iid":
        return f"Nc={run['classes_per_client']}"
    if run.get("sharding") == "dirichlet":
        return f"Dir({run['dirichlet_alpha']})"
    return run.get("sharding")


def method_label(run: dict, experiment: str) -> str:
    """'head only', 'sparse', 'FedAvg' or 'centralized' (dense, trained head), 'dense + ridge head'; for
    notebook 06's remedies 'FedAvgM', 'FedProx', 'TIES', 'Fisher merge', 'SCAFFOLD (sparse)'."""
    head = run.get("finetune.head", "train")
    if experiment == HEAD_ONLY:
        return "head only"
    client = {"fedprox": "FedProx", "scaffold": "SCAFFOLD"}.get(run.get("algorithm"))
    remedy = client or {"ties": "TIES", "fisher": "Fisher merge"}.get(run.get("merge_rule"))
    if run.get("finetune.mask_rule"):
        return f"{remedy} (sparse)" if remedy else "sparse"
    if head != "train":
        return f"dense + {head} head"
    if remedy:
        return remedy
    if experiment == REMEDIES and (run.get("server_momentum", 0) > 0 or run.get("server_lr", 1) != 1):
        return "FedAvgM"
    return "FedAvg" if "sharding" in run else "centralized"


def read_run(folder: Path) -> dict:
    """A run's config (nested keys flattened: finetune.head), summary and run_dir, as one dict."""
    config = json.loads((folder / "config.json").read_text())
    flat_config = pd.json_normalize(config).to_dict("records")[0]
    summary = json.loads((folder / "summary.json").read_text())
    return {**flat_config, **summary, "run_dir": str(folder)}


def table_order(run: dict) -> tuple:
    """iid first, then by Nc, then by mask rule in the order of masks.RULES (dense first)."""
    sharding_rank = {"iid": -1, "non_iid": 0}.get(run.get("sharding"), 1)
    rule_rank = RULES.index(run["rule"]) if run["rule"] else -1
    return sharding_rank, run.get("classes_per_client") or 0, rule_rank


def load_runs(root, experiment: str) -> pd.DataFrame:
    """One row per complete run of the experiment's recorded grid (runs.grid_runs): flattened config,
    summary, run_dir, labels. A run of another grid in the store is never read.

    Labels: sharding_label ('iid', 'Nc=5', 'Dir(0.1)'), method ('FedAvg', 'dense + ridge head', 'sparse',
    'head only'), rule, and sparsity and calibration_rounds (NaN for dense runs, where they do not
    matter), full_val_curve (False where the config has none). Rows in `table_order`. Empty (no
    columns) when the experiment has no complete run.
    """
    rows = []
    for folder in grid_runs(root, experiment):
        run = read_run(folder)
        rule = run.get("finetune.mask_rule")
        run["sharding_label"] = sharding_label(run)
        run["rule"] = rule
        run["method"] = method_label(run, experiment)
        run.setdefault("full_val_curve", False)  # config.json has it only where True
        for key in ("sparsity", "calibration_rounds"):  # NaN for dense runs, where they do not matter
            run[key] = run.get(f"finetune.{key}") if rule else np.nan
        rows.append(run)
    rows.sort(key=table_order)
    return pd.DataFrame(rows)


def complete_runs(root, experiment) -> pd.DataFrame:
    """`load_runs`, or NoResults when the experiment has no complete run yet."""
    if (runs := load_runs(root, experiment)).empty:
        raise NoResults(f"no complete run of {experiment} under {root}")
    return runs


def run_curves(runs: pd.DataFrame, columns) -> pd.DataFrame:
    """The metrics.csv rows of `runs`, each with the run's run_dir and `columns`."""
    curves = []
    for _, run in runs.iterrows():
        metrics = pd.read_csv(Path(run["run_dir"], "metrics.csv"))
        labels = {c: run.get(c) for c in ("run_dir", *columns)}
        curves.append(metrics.assign(**labels))
    return pd.concat(curves, ignore_index=True)


def load_curves(root, experiment, columns=("seed",)) -> pd.DataFrame:
    """metrics.csv of every complete run (a row per epoch or round), with the chosen columns of load_runs."""
    return run_curves(complete_runs(root, experiment), columns)


def val_curves(runs: pd.DataFrame, columns=()) -> pd.DataFrame:
    """The evaluated metrics.csv rows of the `runs` that evaluated the full validation split at every
    point (config full_val_curve), each with `images`, the images trained on up to it, and `columns`.

    The other runs give no curve: theirs mixes the evaluation subset's points with the full split's
    last one, and at 88 % accuracy the subset's standard error (about a point) hides the gains read off
    a curve. NoResults when no run has such a curve.
    """
    full = runs[runs["full_val_curve"].eq(True)]  # NaN (a concat without it) is not True
    if full.empty:
        raise NoResults("no run evaluated the full validation split at every point (full_val_curve)")
    curves = run_curves(full, columns)
    curves["images"] = curves.groupby("run_dir")["samples"].cumsum()
    return curves.dropna(subset=["val_acc"])


def read_csv(root, name: str) -> pd.DataFrame:
    """A table notebook 00 saved under <root>/00_data/ (split_sizes.csv, shard_stats.csv)."""
    if not (path := Path(root, DATA, name)).is_file():
        raise NoResults(f"{path} does not exist (run notebook 00)")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- statistics and selection


def mean_std(runs: pd.DataFrame, keys: list[str], extra=()) -> pd.DataFrame:
    """Per configuration (`keys`): test accuracy mean, std, n; `val`, the mean final validation
    accuracy that selection uses; trained_images, the images a run trained on; and the mean of each
    `extra` column. Seed means; NaN where no run has the value (no test evaluated, an older run)."""
    means = ["trained_images", *extra]
    numeric = {c: pd.to_numeric(runs.get(c, np.nan)) for c in ["final_test_acc", *means]}
    runs = runs.assign(**numeric)
    return (
        runs.groupby(keys, sort=False, dropna=False)
        .agg(
            mean=("final_test_acc", "mean"),
            std=("final_test_acc", "std"),
            n=("run_dir", "count"),
            val=("final_val_acc", "mean"),
            **{c: (c, "mean") for c in means},
        )
        .reset_index()
        .fillna({"std": 0.0})
    )


def choose(table: pd.DataFrame, within=(), among=None) -> pd.DataFrame:
    """`table` with a column `chosen`: per group of `within`, the row of highest `val` among the rows
    where `among` is true (all by default); on a tie the lower lr (where the table has an lr column),
    then the first in table order. The rule of the module docstring, the one the searches choose by
    (experiments.seed_means)."""
    candidates = table if among is None else table[among]
    ranked = candidates.dropna(subset=["val"])
    if "lr" in ranked:
        ranked = ranked.sort_values("lr", kind="stable")
    ranked = ranked.sort_values("val", ascending=False, kind="stable")  # stable: ties keep the order above
    best = ranked.drop_duplicates(list(within)).index if within else ranked.index[:1]
    return table.assign(chosen=table.index.isin(best))


# --------------------------------------------------------------------------- tables


def split_table(root) -> pd.DataFrame:
    """Notebook 00: images per split (train, validation, test)."""
    return read_csv(root, "split_sizes.csv")


def shard_table(root) -> pd.DataFrame:
    """Notebook 00, per sharding scheme: clients, samples and classes per client, mean largest-class share."""
    return (
        read_csv(root, "shard_stats.csv")
        .groupby("scheme", sort=False)
        .agg(
            clients=("client", "count"),
            samples_min=("samples", "min"),
            samples_max=("samples", "max"),
            classes_min=("classes", "min"),
            classes_max=("classes", "max"),
            largest_class_share=("largest_class_share", "mean"),
        )
        .reset_index()
    )


def lr_search_table(root, experiment: str = LR_SEARCH) -> pd.DataFrame:
    """`val` of every (lr, weight_decay) of notebook 01's search (or 02's, 04's: FEDAVG_, SPARSE_LR_SEARCH,
    SPARSE_CENTRAL_LR_SEARCH); `chosen`: the pair kept. A centralized search has a row per (scheduler,
    lr, weight_decay) and a pair chosen per scheduler: notebook 01 runs its grid under every scheduler,
    and each scheduler is compared at its own choice."""
    runs = complete_runs(root, experiment)
    keys = [key for key in ("scheduler", "lr", "weight_decay") if key in runs]
    table = mean_std(runs.sort_values(keys, kind="stable"), keys)
    return choose(table, keys[:-2])


def search_table(root, experiment: str) -> pd.DataFrame:
    """`val` of every setting one of notebook 06's searches tried (the fields it chooses, SEARCHED) and
    `chosen`, the setting kept."""
    keys = list(SEARCHED[EXPERIMENTS[experiment].search].values())
    return choose(mean_std(complete_runs(root, experiment), keys))


def centralized_table(root) -> pd.DataFrame:
    """Notebook 01, per scheduler at its own lr and weight_decay (its search's choice): test accuracy,
    `val`, `chosen` (the best scheduler) and epochs_to_99, the first epoch whose seed-mean validation
    accuracy reaches 99 % of its final value, read from the curves on the full validation split
    (val_curves; NaN for a scheduler without one)."""
    runs = complete_runs(root, CENTRALIZED)
    mean = pd.Series()
    with contextlib.suppress(NoResults):  # no run evaluated the full validation split at every point
        curves = val_curves(runs, ["scheduler"])
        mean = curves.groupby(["scheduler", "epoch"])["val_acc"].mean()
    table = choose(mean_std(runs, ["scheduler", "lr", "weight_decay"]))
    table["epochs_to_99"] = [first_epoch_at(mean.get(s), 0.99) for s in table["scheduler"]]
    return table


def first_epoch_at(curve: pd.Series | None, fraction: float) -> float:
    """The first epoch (index) at which `curve` reaches `fraction` of its final value; NaN without one."""
    if curve is None:
        return np.nan
    reached = curve >= fraction * curve.iloc[-1]
    if not reached.any():  # a NaN final value
        return np.nan
    return reached.idxmax()  # the first True


def _reference(root) -> pd.DataFrame:
    """Notebook 02's reference: the centralized cosine runs (at cosine's own lr and weight decay)."""
    return (
        complete_runs(root, CENTRALIZED).query("scheduler == 'cosine'").assign(method="centralized (cosine)")
    )


def participants(runs: pd.DataFrame) -> pd.Series:
    """Clients per round of each FedAvg run: m = max(1, round(C * K)), as fedavg.clients_per_round."""
    return np.maximum(1, np.round(runs["participation"] * runs["num_clients"]))


def fedavg_runs(root) -> pd.DataFrame:
    """Notebook 02's FedAvg (iid) runs and, where notebook 01 ran, the centralized reference, labelled."""
    runs = complete_runs(root, FEDAVG_IID).assign(method="FedAvg (iid)")
    with contextlib.suppress(NoResults):  # no centralized run
        runs = pd.concat([_reference(root), runs], ignore_index=True)
    return runs


def sample_curves(root) -> pd.DataFrame:
    """Validation loss and accuracy of FedAvg (iid) and of the centralized reference against `images`,
    the images trained on so far (metrics.csv's samples, summed), from the runs evaluated on the full
    validation split at every point (val_curves)."""
    return val_curves(fedavg_runs(root), ["seed", "method"])


def fedavg_table(root) -> pd.DataFrame:
    """Notebook 02: the centralized reference and FedAvg (iid): test accuracy over seeds, the images each
    trained on, and each one's seed-mean validation accuracy (val_at_budget) at `budget`, the most images
    both processed (interpolated on sample_curves; NaN where a method has no such curve)."""
    table = mean_std(fedavg_runs(root), ["method"])
    table["budget"] = table["val_at_budget"] = np.nan
    with contextlib.suppress(NoResults):  # no run evaluated the full validation split at every point
        curves = sample_curves(root)
        mean = curves.groupby(["method", "images"])["val_acc"].mean()
        budget = curves.groupby("method")["images"].max().min()
        table["budget"] = budget
        table["val_at_budget"] = [interpolate(mean.get(m), budget) for m in table["method"]]
    return table


def interpolate(curve: pd.Series | None, x: float) -> float:
    """`curve` (indexed by its x values) linearly interpolated at `x`; NaN without a curve."""
    return np.nan if curve is None else np.interp(x, curve.index, curve)


def late_gain(root) -> str:
    """Notebook 02: how much the seed-mean validation accuracy of FedAvg (iid) rose over the last 20 % of
    rounds (from the last evaluation at or before 80 % of the rounds to the end), as a sentence; read
    only from curves on the full validation split at every point (val_curves), else no number."""
    runs = complete_runs(root, FEDAVG_IID)
    try:
        curves = val_curves(runs)
    except NoResults:
        return "FedAvg (iid): no late-round gain: its curves mix evaluation sets (subset, then full)"
    mean = curves.groupby("round")["val_acc"].mean()
    start = mean[mean.index <= 0.8 * mean.index[-1]].tail(1)
    if start.empty:
        return "FedAvg (iid): too few evaluations"
    return (
        f"FedAvg (iid): validation accuracy {(mean.iloc[-1] - start.sum()) * 100:+.2f} points from round "
        f"{start.index.max()} to {mean.index[-1]} (seed mean, the full validation split at every point). "
        "It says whether accuracy still rose within these rounds, not what more rounds would reach."
    )


def heterogeneity_table(root) -> pd.DataFrame:
    """Notebook 03: test accuracy and images trained on, over seeds, per sharding and local steps J."""
    return mean_std(complete_runs(root, HETEROGENEITY), ["sharding_label", "local_steps"])


def drift_table(root, experiment=HETEROGENEITY) -> pd.DataFrame:
    """Per run: the drift and interference diagnostics averaged over rounds, with the run's labels.

    update_efficiency = ||average delta|| / mean ||client delta||: 1 when the clients agree, about
    1/sqrt(m) when their m deltas are orthogonal.
    """
    runs = complete_runs(root, experiment)
    drift = run_curves(runs, []).groupby("run_dir")[DRIFT].mean()
    drift["update_efficiency"] = drift["avg_delta_norm"] / drift["mean_client_delta_norm"]
    return runs[["run_dir", "seed", "sharding_label", "local_steps", "rule", "sparsity"]].merge(
        drift.reset_index(), on="run_dir"
    )


def sparse_table(root) -> pd.DataFrame:
    """Notebook 04, per sharding, method, sparsity and calibration rounds: test accuracy over seeds,
    `val`, the images trained on, the last calibration round's Fisher threshold and clip_fraction, the
    share of optimizer steps whose gradient the clip scaled down (seed means; NaN for the head alone),
    and `chosen`, the best sparse setting per sharding. The dense references run the same rounds: FedAvg,
    the frozen step-0 head with a dense backbone, and the head alone ('head only') where it ran."""
    sparse_and_dense = complete_runs(root, SPARSE_FL)
    head_only = load_runs(root, HEAD_ONLY)  # empty where it did not run
    runs = pd.concat([sparse_and_dense, head_only], ignore_index=True)
    thresholds = runs.get("thresholds", runs["seed"])  # a list per sparse run: one threshold per round
    runs["threshold"] = [t[-1] if isinstance(t, list) and t else np.nan for t in thresholds]
    keys = ["sharding_label", "method", "sparsity", "calibration_rounds"]
    table = mean_std(runs, keys, ["threshold", "clip_fraction"])
    return choose(table, ["sharding_label"], among=table["method"] == "sparse")


def sparse_central_table(root) -> pd.DataFrame:
    """Notebook 04: centralized sparse fine-tuning per sparsity and R: test accuracy over seeds, the
    images trained on and clip_fraction, with its scheduler and lr (01's scheduler, its own lr)."""
    keys = ["scheduler", "lr", "sparsity", "calibration_rounds"]
    return mean_std(complete_runs(root, SPARSE_CENTRAL), keys, ["clip_fraction"])


def rules_table(root) -> pd.DataFrame:
    """Notebook 05, per sharding, sparsity and mask rule (least-sensitive first): test accuracy and
    images trained on, over seeds, and `chosen`, the best rule per sharding and sparsity."""
    table = mean_std(complete_runs(root, MASK_RULES), ["sharding_label", "sparsity", "rule"])
    return choose(table, ["sharding_label", "sparsity"])


def interference_table(root) -> pd.DataFrame:
    """Notebook 05: drift_table's diagnostics per sharding, sparsity and rule, averaged over seeds."""
    drift = drift_table(root, MASK_RULES).drop(columns=["run_dir", "local_steps"])
    return drift.groupby(["sharding_label", "sparsity", "rule"], sort=False).mean().reset_index()


def remedy_table(root) -> pd.DataFrame:
    """Notebook 06, per sharding and method: test accuracy over seeds, `val`, the images trained on, and
    the round means of the sign-conflict fraction and sign agreement of the round's client deltas,
    before the server merges them (seed means); `chosen`: the best method per sharding."""
    runs = complete_runs(root, REMEDIES)
    drift = drift_table(root, REMEDIES)[["run_dir", "sign_conflict_fraction", "sign_agreement"]]
    table = mean_std(runs.merge(drift, on="run_dir"), ["sharding_label", "method"], drift.columns[1:])
    return choose(table, ["sharding_label"])


def mask_runs(root) -> pd.DataFrame:
    """Notebook 05's iid runs at its smallest sparsity and seed: the runs whose masks are compared."""
    runs = complete_runs(root, MASK_RULES).query("sharding_label == 'iid'")
    sparsest = runs["sparsity"] == runs["sparsity"].min()
    first_seed = runs["seed"] == runs["seed"].min()
    return runs[sparsest & first_seed]


def _rule_masks(root) -> dict:
    """rule -> {parameter name: bool mask} of the mask_runs."""
    masks = {}
    for run in mask_runs(root).itertuples():
        path = Path(run.run_dir, "prepared.pt")
        prepared = torch.load(path, weights_only=True)  # the masks bit-packed
        masks[run.rule] = unpack_masks(prepared["masks"])
    return masks


def mask_overlap_table(root) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of the rules' trainable sets (1 when both are empty), per
    pair of rules, for notebook 05's iid runs at its smallest sparsity and seed."""
    masks = _rule_masks(root)
    rules = list(masks)
    overlaps = [[jaccard(masks[a], masks[b]) for b in rules] for a in rules]
    return pd.DataFrame(overlaps, index=rules, columns=rules)


def block_density_table(root) -> pd.DataFrame:
    """Per rule and transformer block (-1: parameters outside the blocks), entries and the trainable
    fraction, for notebook 05's iid runs at its smallest sparsity and seed."""
    per_rule = [mask_density_by_parameter(m).assign(rule=r) for r, m in _rule_masks(root).items()]
    per_block = pd.concat(per_rule).groupby(["rule", "block"], sort=False)
    table = per_block[["entries", "trainable"]].sum().reset_index()
    table["density"] = table["trainable"] / table["entries"]
    return table
