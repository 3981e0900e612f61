"""What each experiment contributes to the report: one function per notebook (00-05).

Each add_* function reads its experiment through the ReportWriter, and sets
macros, writes tables and draws figures with it. It returns early when its
experiment has no results: the writer then leaves placeholders (report.py).
Numbers are aggregated over seeds with analysis.mean_std (std with ddof=1).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import analysis, plots
from .data import CROP_PADDING
from .experiments import (CENTRALIZED, FEDAVG_IID, HEAD_ONLY, HETEROGENEITY, LR_SEARCH, MASK_RULES, SPARSE_CENTRAL,
                          SPARSE_FL, best_search_result)
from .heads import LOGIT_SCALES
from .latex import (NA, booktabs, cell, count_range, integer, latex_escape, listing, number, percent, points,
                    scientific, seeds_text, setting_tex, sharding_tex, single_percent, value_range)
from .runs import read_metrics
from .schedules import STEP_GAMMA, STEP_MILESTONES
from .sensitivity import ATTENUATION, RULES

if TYPE_CHECKING:
    from .report import ReportWriter

DATA = "00_data"  # notebook 00 writes shard_stats.csv and split_sizes.csv here
SHARDING_KEYS = {"iid": "Iid", "non_iid": "NonIid"}  # macro spelling of the two shardings of notebooks 04-05
RULE_KEYS = {rule: "".join(part.capitalize() for part in rule.split("_")) for rule in RULES}
SCHEDULER_KEYS = {"cosine": "Cosine", "step": "Step", "constant": "Constant"}


# =========================================================================== helpers on frames

def seed_count(frame: pd.DataFrame) -> int:
    return int(frame["seed"].nunique()) if "seed" in frame and len(frame) else 0


def provenance(profile: str, frame: pd.DataFrame) -> str:
    if frame.empty:
        return f"profile {latex_escape(profile)}, no results yet"
    return f"profile {latex_escape(profile)}, {seeds_text(seed_count(frame))}"


def warn_duplicates(writer: ReportWriter, frame: pd.DataFrame, keys: list[str], experiment: str) -> None:
    """Runs that share a setting and a seed but differ otherwise would be averaged together: say so."""
    present = [k for k in keys + ["seed"] if k in frame]
    if len(frame) and frame.duplicated(present).any():
        writer.warn(f"{experiment}: several runs share {present}; they differ in other settings and are "
                    "averaged together (remove stale runs from the results folder)")


def run_curves(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """metrics.csv of every run in `frame`, with the chosen config columns (NaN where a run lacks one)."""
    parts = []
    for _, run in frame.iterrows():
        metrics = read_metrics(run["run_dir"])
        for column in columns:
            metrics[column] = run.get(column, np.nan)
        parts.append(metrics)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def as_percent(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.assign(**{c: frame[c] * 100 for c in columns if c in frame})


def chosen_hparams(writer: ReportWriter, frame: pd.DataFrame) -> pd.DataFrame:
    """The runs at the learning rate and weight decay notebook 01 chose (all runs if it chose none)."""
    path = writer.root / "hparams.json"
    if frame.empty or not path.is_file():
        return frame
    chosen = json.loads(path.read_text())
    if not {"lr", "weight_decay"} <= set(chosen):
        return frame
    selected = frame[np.isclose(frame["lr"], chosen["lr"]) & np.isclose(frame["weight_decay"], chosen["weight_decay"])]
    return selected if len(selected) else frame


def config_value(frame: pd.DataFrame, column: str) -> str:
    """The one value `column` takes in `frame` (several values joined by ', ')."""
    values = frame[column].dropna().unique() if column in frame else []
    return listing(sorted(values)) if len(values) else NA


# =========================================================================== sections

def add_overview(writer: ReportWriter) -> None:
    """Profile, dataset and model, and the notice that a non-full build holds no real results."""
    writer.set("ResultsProfile", latex_escape(writer.profile))
    names = {"cifar100": "CIFAR-100", "synthetic": "synthetic CIFAR-shaped data"}
    models = {"dino_vits16": "DINO ViT-S/16", "tiny_vit": "a tiny randomly initialised ViT"}
    for experiment in (LR_SEARCH, CENTRALIZED, FEDAVG_IID, HETEROGENEITY, SPARSE_FL, MASK_RULES):
        frame = writer.experiment(experiment)
        if len(frame):
            dataset, model = frame["dataset"].iloc[0], frame["model"].iloc[0]
            writer.set("ResultsDataset", names.get(dataset, latex_escape(dataset)))
            writer.set("ResultsModel", models.get(model, latex_escape(model)))
            break
    notice = "" if writer.profile == "full" else (
        "\\fbox{\\parbox{0.96\\linewidth}{\\small\\textbf{Not results: a " + latex_escape(writer.profile) +
        " build.} Every number, table and figure below comes from the \\texttt{" + latex_escape(writer.profile) +
        "} profile (\\ResultsDataset, \\ResultsModel), which checks that the pipeline runs end to end. "
        "Only a build from the \\texttt{full} profile reports the study.}}")
    writer.set("ResultsNotice", notice)


def add_constants(writer: ReportWriter) -> None:
    """Constants of the method as the code defines them, so the text cannot drift from the code."""
    writer.set("Attenuation", number(ATTENUATION))
    writer.set("CropPadding", CROP_PADDING)
    writer.set("StepGamma", number(STEP_GAMMA))
    writer.set("StepMilestones", " and ".join(f"{m * 100:g}\\,\\%" for m in STEP_MILESTONES))
    writer.set("LogitScaleGrid", f"{len(LOGIT_SCALES)} log-spaced values from {number(min(LOGIT_SCALES))} "
                                 f"to {number(max(LOGIT_SCALES))}")


def add_data(writer: ReportWriter) -> None:
    """Notebook 00: split sizes, shard statistics (figure and table)."""
    sizes = writer.csv(f"{DATA}/split_sizes.csv")
    if len(sizes):
        images = sizes.set_index("split")["images"]
        for macro, split in (("TrainSize", "train"), ("ValSize", "validation"), ("TestSize", "test")):
            if split in images:
                writer.set(macro, integer(images[split]))
        if {"train", "validation"} <= set(images.index):
            share = images["validation"] / (images["train"] + images["validation"])
            writer.set("ValFraction", f"{share * 100:.0f}\\,\\%")
    stats = writer.csv(f"{DATA}/shard_stats.csv")
    if stats.empty:
        return
    writer.set("NumClients", integer(stats["client"].nunique()))
    writer.set("DataProvenance", f"profile {latex_escape(writer.profile)}, shards of one seed")
    writer.figure("shard_stats", lambda: plots.shard_statistics_figure(stats, writer.profile))
    summary = stats.groupby("scheme", sort=False).agg(
        samples_min=("samples", "min"), samples_max=("samples", "max"), classes_min=("classes", "min"),
        classes_max=("classes", "max"), share=("largest_class_share", "mean")).reset_index()
    rows = [[sharding_tex(r.scheme), value_range(r.samples_min, r.samples_max),
             value_range(r.classes_min, r.classes_max), f"{r.share:.2f}"] for r in summary.itertuples()]
    writer.table("shards", booktabs(["sharding", "samples", "classes", "largest class"], rows, "lrrr"))


def add_lr_search(writer: ReportWriter) -> None:
    """Notebook 01, part 1: the learning-rate x weight-decay grid judged on validation."""
    search = writer.experiment(LR_SEARCH)
    if search.empty:
        return
    best = best_search_result(search)
    writer.set("SearchRuns", len(search))
    writer.set("SearchEpochs", config_value(search, "epochs"))
    writer.set("SearchLrs", config_value(search, "lr"))
    writer.set("SearchWeightDecays", config_value(search, "weight_decay"))
    writer.set("ChosenLr", number(best["lr"]))
    writer.set("ChosenWeightDecay", number(best["weight_decay"]))
    writer.set("SearchValAcc", single_percent(best["search_val_acc"]))
    writer.set("SearchProvenance", provenance(writer.profile, search))
    writer.figure("lr_search", lambda: plots.lr_search_figure(search, writer.profile))


def add_centralized(writer: ReportWriter) -> None:
    """Notebook 01, part 2: schedulers at the chosen learning rate (curves, table, macros)."""
    runs = chosen_hparams(writer, writer.experiment(CENTRALIZED))
    if runs.empty:
        return
    warn_duplicates(writer, runs, ["scheduler"], CENTRALIZED)
    curves = run_curves(runs, ["scheduler", "seed"])
    table = analysis.mean_std(runs, ["scheduler"], "final_test_acc")
    table["epochs_99"] = [analysis.epochs_to_fraction(curves[curves["scheduler"] == s], "epoch", "test_acc", 0.99)
                          for s in table["scheduler"]]
    ranked = table.sort_values("mean", ascending=False)
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    writer.set("CentralizedSeeds", seed_count(runs))
    writer.set("CentralizedEpochs", config_value(runs, "epochs"))
    writer.set("CentralizedBatchSize", config_value(runs, "batch_size"))
    writer.set("WarmupEpochs", config_value(runs, "warmup_epochs"))
    writer.set("SchedulerList", ", ".join(latex_escape(s) for s in table["scheduler"]))
    writer.set("BestScheduler", latex_escape(best["scheduler"]))
    writer.set("CentralizedBestAcc", percent(best["mean"], best["std"]))
    writer.set("SchedulerGap", points(best["mean"] - worst["mean"]))
    writer.set("CentralizedEpochsToNinetyNine", number(best["epochs_99"]))
    writer.set("CentralizedProvenance", provenance(writer.profile, runs))
    for row in table.itertuples():
        if row.scheduler in SCHEDULER_KEYS:
            writer.set(f"Centralized{SCHEDULER_KEYS[row.scheduler]}Acc", percent(row.mean, row.std))
    cosine = table[table["scheduler"] == "cosine"]
    if len(cosine):
        writer.set("CentralizedAcc", percent(cosine["mean"].iloc[0], cosine["std"].iloc[0]))
    rows = [[latex_escape(r.scheduler), cell(r.mean, r.std), str(r.n), number(r.epochs_99)]
            for r in ranked.itertuples()]
    writer.table("centralized", booktabs(["scheduler", "test acc. (\\%)", "$n$", "epochs to 99\\,\\%"], rows, "lrrr"))
    writer.figure("centralized_curves", lambda: plots.curves_figure(
        as_percent(curves, ["test_acc"]), "epoch", ["test_loss", "test_acc"], "scheduler", "epoch",
        ["test loss", "test accuracy (%)"], f"Centralized, {plots.provenance(writer.profile, seed_count(runs))}"))


def train_size(writer: ReportWriter) -> int | None:
    """Images in the train split (notebook 00's table), to put epochs and rounds on one axis."""
    path = writer.root / DATA / "split_sizes.csv"
    if not path.is_file():
        return None
    sizes = pd.read_csv(path).set_index("split")["images"]
    return int(sizes["train"]) if "train" in sizes else None


def central_reference(writer: ReportWriter) -> pd.DataFrame:
    """The centralized cosine runs at the chosen hyperparameters (notebook 02's reference)."""
    runs = chosen_hparams(writer, writer.experiment(CENTRALIZED))
    return runs[runs["scheduler"] == "cosine"] if len(runs) else runs


def add_fedavg(writer: ReportWriter) -> None:
    """Notebook 02: FedAvg on iid shards against the centralized reference."""
    runs = writer.experiment(FEDAVG_IID)
    if runs.empty:
        return
    warn_duplicates(writer, runs, [], FEDAVG_IID)
    fed = analysis.mean_std(runs, ["sharding"], "final_test_acc").iloc[0]
    first = runs.iloc[0]
    writer.set("FedAvgSeeds", seed_count(runs))
    for macro, column in (("FedAvgRounds", "rounds"), ("FedAvgLocalSteps", "local_steps"),
                          ("FedAvgBatchSize", "batch_size"), ("FedAvgClients", "num_clients"),
                          ("FedAvgParticipation", "participation")):
        writer.set(macro, config_value(runs, column))
    writer.set("FedAvgClientsPerRound", max(1, round(first["participation"] * first["num_clients"])))
    writer.set("FedAvgIidAcc", percent(fed["mean"], fed["std"]))
    writer.set("FedAvgProvenance", provenance(writer.profile, runs))
    rows = [["FedAvg, iid", cell(fed["mean"], fed["std"]), str(fed["n"])]]
    central = central_reference(writer)
    if len(central):
        reference = analysis.mean_std(central, ["scheduler"], "final_test_acc").iloc[0]
        writer.set("FedAvgCentralGap", points(reference["mean"] - fed["mean"]))
        rows.insert(0, ["centralized, cosine", cell(reference["mean"], reference["std"]), str(reference["n"])])
    writer.table("fedavg", booktabs(["method", "test acc. (\\%)", "$n$"], rows, "lrr"))
    fedavg_comparison(writer, runs, central)


def fedavg_comparison(writer: ReportWriter, runs: pd.DataFrame, central: pd.DataFrame) -> None:
    """FedAvg and centralized curves on one axis (images processed), and both at the largest common budget."""
    fed_curves = run_curves(runs, ["seed", "local_steps", "batch_size", "num_clients", "participation"])
    size = train_size(writer)
    central_curves = run_curves(central, ["seed"]) if len(central) and size else pd.DataFrame()
    comparison = analysis.processed_samples(fed_curves, central_curves, size or 0)
    if len(central_curves):
        equal = analysis.accuracy_at_equal_samples(comparison).set_index("method")
        writer.set("EqualSamplesBudget", integer(equal["samples"].iloc[0]))
        writer.set("FedAvgAccAtEqualSamples", single_percent(equal.loc["FedAvg", "test_acc"]))
        writer.set("CentralAccAtEqualSamples", single_percent(equal.loc["centralized", "test_acc"]))

    def comparison_figure():
        fig = plots.curves_figure(
            as_percent(comparison.dropna(subset=["test_acc"]), ["test_acc"]), "samples", ["test_loss", "test_acc"],
            "method", "training images processed", ["test loss", "test accuracy (%)"],
            f"FedAvg (iid) vs centralized, {plots.provenance(writer.profile, seed_count(runs))}")
        plots.count_axis(fig)
        return fig

    writer.figure("fedavg_vs_central", comparison_figure)


def add_heterogeneity(writer: ReportWriter) -> None:
    """Notebook 03: sharding x J grid (heatmap, table, curves) and the drift diagnostics."""
    runs = writer.experiment(HETEROGENEITY)
    if runs.empty:
        return
    runs = analysis.with_sharding_label(runs)
    warn_duplicates(writer, runs, ["sharding_label", "local_steps"], HETEROGENEITY)
    table = analysis.mean_std(runs, ["sharding_label", "local_steps"], "final_test_acc")
    seeds = seed_count(runs)
    writer.set("HeteroSeeds", seeds)
    writer.set("HeteroNcList", config_value(runs, "classes_per_client"))
    writer.set("HeteroJList", config_value(runs, "local_steps"))
    writer.set("HeteroStepBudget", listing(sorted((runs["rounds"] * runs["local_steps"]).unique())))
    writer.set("HeteroProvenance", provenance(writer.profile, runs))
    heterogeneity_macros(writer, table)
    heterogeneity_table(writer, table)
    curves = analysis.with_sharding_label(run_curves(runs, ["seed", "local_steps", "sharding", "classes_per_client",
                                                            "dirichlet_alpha"]))
    drift = analysis.drift_summary(curves)
    drift_macros(writer, table, drift)
    writer.figure("heterogeneity_heatmap", lambda: plots.heterogeneity_heatmap(table, writer.profile, seeds))
    writer.figure("heterogeneity_curves", lambda: plots.heterogeneity_curves(curves, writer.profile, seeds))
    writer.figure("drift", lambda: plots.drift_figure(drift, writer.profile, seeds))


def heterogeneity_macros(writer: ReportWriter, table: pd.DataFrame) -> None:
    best = table.loc[table["mean"].idxmax()]
    worst = table.loc[table["mean"].idxmin()]
    writer.set("HeteroBestSetting", setting_tex(best["sharding_label"], best["local_steps"]))
    writer.set("HeteroBestAcc", percent(best["mean"], best["std"]))
    writer.set("HeteroWorstSetting", setting_tex(worst["sharding_label"], worst["local_steps"]))
    writer.set("HeteroWorstAcc", percent(worst["mean"], worst["std"]))
    iid = table[table["sharding_label"] == "iid"].set_index("local_steps")
    if len(iid):
        smallest = iid.loc[iid.index.min()]
        writer.set("HeteroIidAcc", percent(smallest["mean"], smallest["std"]))
    if worst["local_steps"] in iid.index:
        writer.set("HeteroWorstGap", points(iid.loc[worst["local_steps"], "mean"] - worst["mean"]))


def heterogeneity_table(writer: ReportWriter, table: pd.DataFrame) -> None:
    """Rows: shardings (iid first), columns: J; cells mean +- std; n: seeds per cell (min-max)."""
    steps = sorted(table["local_steps"].unique())
    rows = []
    for label, group in table.groupby("sharding_label", sort=False):
        by_steps = group.set_index("local_steps")
        cells = [cell(by_steps.loc[j, "mean"], by_steps.loc[j, "std"]) if j in by_steps.index else "--"
                 for j in steps]
        rows.append([sharding_tex(label), *cells, count_range(group["n"])])
    header = ["sharding", *[f"$J{{=}}{int(j)}$" for j in steps], "$n$"]
    writer.table("heterogeneity", booktabs(header, rows, "l" + "r" * len(steps) + "r"))


def drift_macros(writer: ReportWriter, table: pd.DataFrame, drift: pd.DataFrame) -> None:
    """Where client deltas agree least, and whether agreement tracks accuracy across the grid."""
    columns = ["mean_pairwise_cosine", "sign_agreement"]
    per_setting = drift.groupby(["sharding_label", "local_steps"], sort=False)[columns].mean()
    joined = per_setting.join(table.set_index(["sharding_label", "local_steps"])["mean"]).dropna()
    if joined.empty:
        return
    lowest = joined["mean_pairwise_cosine"].idxmin()
    writer.set("HeteroLowestCosineSetting", setting_tex(*lowest))
    writer.set("HeteroLowestCosine", f"{joined.loc[lowest, 'mean_pairwise_cosine']:.3f}")
    writer.set("HeteroLowestCosineSignAgreement", f"{joined.loc[lowest, 'sign_agreement']:.3f}")
    iid = joined.xs("iid", level="sharding_label") if "iid" in joined.index.get_level_values(0) else None
    if iid is not None:
        writer.set("HeteroIidCosine", f"{iid.loc[iid.index.min(), 'mean_pairwise_cosine']:.3f}")
    if len(joined) >= 3:
        correlation = joined["mean"].rank().corr(joined["mean_pairwise_cosine"].rank())  # Spearman
        writer.set("HeteroCosineCorrelation", f"${correlation:+.2f}$" if not math.isnan(correlation) else NA)


def sharding_key(label: str) -> str:
    return "Iid" if label == "iid" else "NonIid"


def add_sparse(writer: ReportWriter) -> None:
    """Notebook 04: sparsity x calibration rounds, baselines, the head alone, centralized sparse."""
    add_sparse_central(writer)
    runs = writer.experiment(SPARSE_FL)
    if runs.empty:
        return
    runs = analysis.with_method_label(runs)
    warn_duplicates(writer, runs, ["sharding_label", "method", "finetune.sparsity", "finetune.calibration_rounds"],
                    SPARSE_FL)
    table = analysis.sparse_summary(runs)
    head = writer.experiment(HEAD_ONLY)
    head_only = (analysis.mean_std(analysis.with_method_label(head), ["sharding_label"], "final_test_acc")
                 .assign(method="head only") if len(head) else pd.DataFrame())
    seeds = seed_count(runs)
    sparse = table[table["method"].str.startswith("sparse")]
    writer.set("SparseSeeds", seeds)
    writer.set("SparseRounds", config_value(runs, "rounds"))
    writer.set("SparseLocalSteps", config_value(runs, "local_steps"))
    writer.set("SparseNc", config_value(runs, "classes_per_client"))
    writer.set("SparsityList", listing(sorted(sparse["sparsity"].unique())))
    writer.set("CalibrationRoundsList", listing(sorted(sparse["calibration_rounds"].unique())))
    writer.set("CalibrationSamples", config_value(runs, "finetune.calibration_samples"))
    writer.set("RidgeLambda", config_value(runs, "finetune.ridge_lambda"))
    if "logit_scale" in runs:
        writer.set("LogitScale", config_value(runs[runs["sharding_label"] == "iid"].head(1), "logit_scale"))
    writer.set("SparseProvenance", provenance(writer.profile, runs))
    for label, group in table.groupby("sharding_label", sort=False):
        heads = head_only[head_only["sharding_label"] == label] if len(head_only) else head_only
        sparse_macros(writer, sharding_key(label), group, heads)
    sparse_tables(writer, table, head_only)
    with_head = pd.concat([table, head_only], ignore_index=True)
    writer.figure("sparsity", lambda: plots.sparsity_figure(with_head, writer.profile, seeds))
    writer.figure("calibration_rounds", lambda: plots.rounds_figure(table, writer.profile, seeds))


def add_sparse_central(writer: ReportWriter) -> None:
    central = writer.experiment(SPARSE_CENTRAL)
    if central.empty:
        return
    row = analysis.mean_std(central, ["finetune.sparsity"], "final_test_acc").iloc[0]
    writer.set("SparseCentralAcc", percent(row["mean"], row["std"]))
    writer.set("SparseCentralSparsity", number(row["finetune.sparsity"]))
    writer.set("SparseCentralRounds", config_value(central, "finetune.calibration_rounds"))
    writer.set("SparseCentralSeeds", seed_count(central))
    writer.set("SparseCentralProvenance", provenance(writer.profile, central))


def sparse_macros(writer: ReportWriter, key: str, group: pd.DataFrame, head_only: pd.DataFrame) -> None:
    """Best sparse setting and the dense baselines of one sharding."""
    sparse = group[group["method"].str.startswith("sparse")]
    by_method = group.set_index("method")
    if "FedAvg" in by_method.index:
        writer.set(f"Sparse{key}FedAvgAcc", percent(by_method.loc["FedAvg", "mean"], by_method.loc["FedAvg", "std"]))
    dense_head = group[group["method"].str.startswith("dense")]
    if len(dense_head):
        writer.set(f"Sparse{key}DenseHeadAcc", percent(dense_head["mean"].iloc[0], dense_head["std"].iloc[0]))
    if len(head_only):
        writer.set(f"Sparse{key}HeadOnlyAcc", percent(head_only["mean"].iloc[0], head_only["std"].iloc[0]))
    if sparse.empty:
        return
    best = sparse.loc[sparse["mean"].idxmax()]
    writer.set(f"Sparse{key}BestAcc", percent(best["mean"], best["std"]))
    writer.set(f"Sparse{key}BestSparsity", number(best["sparsity"]))
    writer.set(f"Sparse{key}BestRounds", int(best["calibration_rounds"]))
    if not pd.isna(best.get("threshold", np.nan)):
        writer.set(f"Sparse{key}BestThreshold", scientific(best["threshold"]))
    if "FedAvg" in by_method.index:
        writer.set(f"Sparse{key}BestGap", points(best["mean"] - by_method.loc["FedAvg", "mean"]))
    averaged = sparse.groupby("calibration_rounds")["mean"].mean()
    writer.set(f"Sparse{key}BestRoundsAveraged", int(averaged.idxmax()))


def sparse_tables(writer: ReportWriter, table: pd.DataFrame, head_only: pd.DataFrame) -> None:
    """sparse.tex: baselines and best sparse setting per sharding; sparse_grid.tex: the whole grid."""
    labels = list(dict.fromkeys(table["sharding_label"]))
    both = pd.concat([head_only, table], ignore_index=True)
    baselines = ["head only", *[m for m in dict.fromkeys(table["method"]) if not m.startswith("sparse")]]
    rows = []
    for method in baselines:
        chosen = both[both["method"] == method].set_index("sharding_label")
        rows.append([latex_escape(method), *[cell(chosen.loc[l, "mean"], chosen.loc[l, "std"])
                                             if l in chosen.index else "--" for l in labels]])
    sparse = table[table["method"].str.startswith("sparse")]
    best = {l: group.loc[group["mean"].idxmax()] for l, group in sparse.groupby("sharding_label") if len(group)}
    best_cells = [cell(best[l]["mean"], best[l]["std"]) if l in best else "--" for l in labels]
    settings = [f"{number(best[l]['sparsity'])}, $R{{=}}{int(best[l]['calibration_rounds'])}$" if l in best else "--"
                for l in labels]
    rows += [["best sparse", *best_cells], ["\\quad at sparsity, $R$", *settings]]
    header = ["method", *[sharding_tex(l) for l in labels]]
    writer.table("sparse", booktabs(header, rows, "l" + "r" * len(labels)))
    writer.table("sparse_grid", sparse_grid_table(sparse, labels))


def optional(value, formatter) -> str:
    """formatter(value), or '--' where the value is missing."""
    return "--" if value is None or pd.isna(value) else formatter(value)


def sparse_grid_table(sparse: pd.DataFrame, labels: list[str]) -> str:
    """Every (sparsity, R): accuracy per sharding, the iid threshold and achieved sparsity."""
    keys = ["sparsity", "calibration_rounds"]
    grid = sparse[keys].drop_duplicates().sort_values(keys)
    indexed = sparse.set_index(["sharding_label", *keys]).sort_index()
    rows = []
    for sparsity, rounds in grid.itertuples(index=False):
        found = {l: indexed.loc[(l, sparsity, rounds)] for l in labels if (l, sparsity, rounds) in indexed.index}
        cells = [cell(found[l]["mean"], found[l]["std"]) if l in found else "--" for l in labels]
        reference = found.get(labels[0], pd.Series(dtype=float))
        rows.append([number(sparsity), str(int(rounds)), *cells, optional(reference.get("threshold"), scientific),
                     optional(reference.get("achieved_sparsity"), lambda value: f"{value:.3f}")])
    header = ["sparsity", "$R$", *[sharding_tex(l) for l in labels], "threshold", "achieved"]
    groups = [("", 2), ("test acc.\\ (\\%)", len(labels)), (sharding_tex(labels[0]), 2)]
    return booktabs(header, rows, "rr" + "r" * len(labels) + "rr", groups)


def add_mask_rules(writer: ReportWriter) -> None:
    """Notebook 05: the five calibration rules (bars, table, interference), mask overlap, layer density."""
    runs = writer.experiment(MASK_RULES)
    if runs.empty:
        return
    runs = analysis.with_method_label(runs)
    warn_duplicates(writer, runs, ["sharding_label", "finetune.sparsity", "finetune.mask_rule"], MASK_RULES)
    table = analysis.mean_std(runs, ["sharding_label", "finetune.sparsity", "finetune.mask_rule"], "final_test_acc")
    table = in_rule_order(table.rename(columns={"finetune.sparsity": "sparsity", "finetune.mask_rule": "rule"}))
    seeds, sparsity, seed = seed_count(runs), float(table["sparsity"].min()), int(runs["seed"].min())
    writer.set("RulesSeeds", seeds)
    writer.set("RulesSparsityList", listing(sorted(table["sparsity"].unique())))
    writer.set("RulesSparsity", number(sparsity))
    writer.set("RulesRounds", config_value(runs, "finetune.calibration_rounds"))
    writer.set("RulesProvenance", provenance(writer.profile, runs))
    for label, group in table[table["sparsity"] == sparsity].groupby("sharding_label", sort=False):
        rule_macros(writer, sharding_key(label), group)
    writer.table("mask_rules", rules_table(table))
    curves = analysis.with_method_label(run_curves(runs, ["seed", "sharding", "classes_per_client",
                                                          "finetune.mask_rule", "finetune.sparsity"]))
    drift = analysis.drift_by(curves, ["sharding_label", "finetune.sparsity", "finetune.mask_rule", "seed"])
    writer.table("rule_interference", interference_table(drift, sparsity))
    writer.figure("mask_rules", lambda: plots.mask_rules_figure(table, writer.profile, seeds))
    try:
        overlap_figures(writer, runs, sparsity, seed)
    except Exception as error:  # e.g. a run folder without its prepared.pt (masks)
        writer.warn(f"mask overlap and layer density could not be computed ({type(error).__name__}: {error}); "
                    "placeholders used")


def in_rule_order(table: pd.DataFrame, column: str = "rule") -> pd.DataFrame:
    """Rows sorted by the order of sensitivity.RULES (least-sensitive first), stable otherwise."""
    order = {rule: index for index, rule in enumerate(RULES)}
    return table.sort_values(column, key=lambda values: values.map(order), kind="stable")


def rule_macros(writer: ReportWriter, key: str, group: pd.DataFrame) -> None:
    ranked = group.sort_values("mean", ascending=False)
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    writer.set(f"Rules{key}BestRule", latex_escape(best["rule"].replace("_", " ")))
    writer.set(f"Rules{key}BestAcc", percent(best["mean"], best["std"]))
    writer.set(f"Rules{key}WorstRule", latex_escape(worst["rule"].replace("_", " ")))
    writer.set(f"Rules{key}WorstAcc", percent(worst["mean"], worst["std"]))
    if len(ranked) > 1:
        second = ranked.iloc[1]
        writer.set(f"Rules{key}Lead", points(best["mean"] - second["mean"]))
        writer.set(f"Rules{key}LeadStd", f"{(best['std'] + second['std']) * 100:.1f}")
    for row in group.itertuples():
        if row.rule in RULE_KEYS:
            writer.set(f"Rules{key}{RULE_KEYS[row.rule]}Acc", percent(row.mean, row.std))


def rules_table(table: pd.DataFrame) -> str:
    """Rows: rules; columns: sparsities grouped by sharding; cells mean +- std; n: seeds per cell."""
    labels = list(dict.fromkeys(table["sharding_label"]))
    sparsities = sorted(table["sparsity"].unique())
    indexed = table.set_index(["rule", "sharding_label", "sparsity"]).sort_index()
    rows = []
    for rule in [r for r in RULES if r in set(table["rule"])]:
        cells = [cell(indexed.loc[(rule, l, s), "mean"], indexed.loc[(rule, l, s), "std"])
                 if (rule, l, s) in indexed.index else "--" for l in labels for s in sparsities]
        rows.append([latex_escape(rule.replace("_", " ")), *cells, count_range(indexed.loc[rule, "n"])])
    header = ["rule", *[f"$s{{=}}{number(s)}$" for _ in labels for s in sparsities], "$n$"]
    groups = [("", 1), *[(sharding_tex(l), len(sparsities)) for l in labels], ("", 1)]
    return booktabs(header, rows, "l" + "r" * len(labels) * len(sparsities) + "r", groups)


def interference_table(drift: pd.DataFrame, sparsity: float) -> str:
    """Mean pairwise cosine and sign agreement of client deltas per rule and sharding (one sparsity)."""
    chosen = drift[np.isclose(drift["finetune.sparsity"], sparsity)]
    means = chosen.groupby(["finetune.mask_rule", "sharding_label"], sort=False)[
        ["mean_pairwise_cosine", "sign_agreement"]].mean()
    labels = list(dict.fromkeys(chosen["sharding_label"]))
    rows = []
    for rule in [r for r in RULES if r in set(chosen["finetune.mask_rule"])]:
        values = []
        for label in labels:
            if (rule, label) in means.index:
                values += [f"{means.loc[(rule, label), 'mean_pairwise_cosine']:.3f}",
                           f"{means.loc[(rule, label), 'sign_agreement']:.3f}"]
            else:
                values += ["--", "--"]
        rows.append([latex_escape(rule.replace("_", " ")), *values])
    header = ["rule", *["cosine", "sign agr."] * len(labels)]
    groups = [("", 1), *[(sharding_tex(l), 2) for l in labels]]
    return booktabs(header, rows, "l" + "r" * 2 * len(labels), groups)


def overlap_figures(writer: ReportWriter, runs: pd.DataFrame, sparsity: float, seed: int) -> None:
    """Jaccard overlap between the rules' masks and their trainable fraction per block (iid, one seed)."""
    overlap = analysis.mask_overlap(runs, "iid", sparsity, seed)
    present = [rule for rule in RULES if rule in overlap.index]
    overlap = overlap.loc[present, present]
    pairs = {"RulesOverlapLeastMost": "most_sensitive", "RulesOverlapLeastLowest": "lowest_magnitude",
             "RulesOverlapLeastHighest": "highest_magnitude", "RulesOverlapLeastRandom": "random"}
    for macro, other in pairs.items():
        if "least_sensitive" in overlap.index and other in overlap.columns:
            writer.set(macro, f"{overlap.loc['least_sensitive', other]:.3f}")
    title = f"Mask overlap, sparsity {sparsity:g}, iid, seed {seed} ({writer.profile})"
    if len(overlap):
        writer.figure("mask_overlap", lambda: plots.overlap_heatmap(overlap, title))
    density = analysis.layer_density(runs, "iid", sparsity, seed)
    density = in_rule_order(density) if len(density) else density
    if len(density):
        writer.figure("layer_density", lambda: plots.layer_density_figure(
            density, f"Trainable fraction per block, sparsity {sparsity:g}, iid, seed {seed} ({writer.profile})"))


SECTIONS = (add_overview, add_constants, add_data, add_lr_search, add_centralized, add_fedavg, add_heterogeneity,
            add_sparse, add_mask_rules)
