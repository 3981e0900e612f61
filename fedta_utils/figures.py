"""Results -> tables and figures: one loader, one function per table or figure.

    runs = load_runs("results/full", HETEROGENEITY)       # one row per complete run
    table = heterogeneity_table("results/full")           # mean, std, n over seeds
    fig = heterogeneity_heatmap("results/full", "full")   # a matplotlib Figure

Every function takes the results root of one profile (<results_dir>/<profile>); figures also take
the profile, which their titles name with the seed count. The experiment notebooks call these right
after their runs, and report.write_report calls the same functions. A table function raises
NoResults when its experiment has no complete run; a figure function then returns a hatched
placeholder of its own size instead.

Model selection, the one rule of the study: a configuration's score is its validation accuracy at
the final round or epoch (summary key final_val_acc), averaged over seeds. The best configuration
(learning rate and weight decay, scheduler, sparse setting, mask rule) is the one with the highest
score, the first in table order on a tie (e.g. the smaller learning rate), and what is reported for
it is its test accuracy (final_test_acc, mean +- std over seeds): the test set never chooses.
Tables that compare configurations keep every configuration's test accuracy and mark the chosen one
(column `chosen`).

Statistics over seeds: mean, std (ddof=1; 0 for one seed) and n, the number of runs averaged.
Figures: one seaborn theme (paper context, colour-blind palette), sized for the report's column
(COLUMN inches) or its full width (FULL), PDFs with embedded TrueType fonts.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from . import team
from .experiments import (
    CENTRALIZED,
    FEDAVG_IID,
    HEAD_ONLY,
    HETEROGENEITY,
    LR_SEARCH,
    MASK_RULES,
    SPARSE_CENTRAL,
    SPARSE_FL,
    sweeps,
)
from .runs import grid_runs
from .sensitivity import RULES, jaccard, mask_density_by_parameter, unpack_masks

DATA = "00_data"  # notebook 00 saves split_sizes.csv and shard_stats.csv here
COLUMN, FULL = 3.3, 6.9  # inches: one column of the report, both columns
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


def _labelled(run: dict, experiment: str) -> dict:
    """The run with its display labels; sparsity and R only where a mask rule makes them matter."""
    rule, head = run.get("finetune.mask_rule"), run.get("finetune.head", "train")
    trained = "FedAvg" if "sharding" in run else "centralized"  # dense, trained head
    dense = trained if head == "train" else f"dense + {head} head"
    nc, alpha, sharding = run.get("classes_per_client"), run.get("dirichlet_alpha"), run.get("sharding")
    label = f"Nc={nc}" if sharding == "non_iid" else f"Dir({alpha})" if sharding == "dirichlet" else sharding
    return {
        **run,
        "sharding_label": label,
        "rule": rule,
        "method": "head only" if experiment == HEAD_ONLY else "sparse" if rule else dense,
        **{k: run.get(f"finetune.{k}") if rule else np.nan for k in ("sparsity", "calibration_rounds")},
    }


def load_runs(root, experiment: str) -> pd.DataFrame:
    """One row per complete run of the experiment's recorded grid (runs.grid_runs): flattened config,
    summary, run_dir, labels. A run of another grid in the store is never read.

    Labels: sharding_label ('iid', 'Nc=5', 'Dir(0.1)'; rows iid first, then by Nc, then by mask rule in the
    order of sensitivity.RULES), method
    ('FedAvg', 'dense + ridge head', 'sparse', 'head only'), rule, sparsity and calibration_rounds.
    Empty (no columns) when the experiment has no complete run.
    """
    rows = []
    for folder in grid_runs(root, experiment):
        config = json.loads((folder / "config.json").read_text())
        flat = pd.json_normalize(config).to_dict("records")[0]  # nested keys flattened: finetune.head
        summary = json.loads((folder / "summary.json").read_text())
        run = {**flat, **summary, "run_dir": str(folder)}
        rows.append(_labelled(run, experiment))
    rows.sort(
        key=lambda r: (
            {"iid": -1, "non_iid": 0}.get(r.get("sharding"), 1),  # iid, then by Nc,
            r.get("classes_per_client") or 0,
            RULES.index(r["rule"]) if r["rule"] else -1,
        )
    )
    return pd.DataFrame(rows)


def _runs(root, experiment) -> pd.DataFrame:
    if (runs := load_runs(root, experiment)).empty:
        raise NoResults(f"no complete run of {experiment} under {root}")
    return runs


def _curves(runs: pd.DataFrame, columns) -> pd.DataFrame:
    return pd.concat(
        [
            pd.read_csv(Path(run["run_dir"], "metrics.csv")).assign(
                **{c: run.get(c) for c in ("run_dir", *columns)}
            )
            for _, run in runs.iterrows()
        ],
        ignore_index=True,
    )


def load_curves(root, experiment, columns=("seed",)) -> pd.DataFrame:
    """metrics.csv of every complete run (a row per epoch or round), with the chosen columns of load_runs."""
    return _curves(_runs(root, experiment), columns)


def read_csv(root, name: str) -> pd.DataFrame:
    """A table notebook 00 saved under <root>/00_data/ (split_sizes.csv, shard_stats.csv)."""
    if not (path := Path(root, DATA, name)).is_file():
        raise NoResults(f"{path} does not exist (run notebook 00)")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- statistics and selection


def mean_std(runs: pd.DataFrame, keys: list[str], extra=()) -> pd.DataFrame:
    """Per configuration (`keys`): test accuracy mean, std, n; `val`, the mean final validation
    accuracy that selection uses; and the mean of each `extra` column."""
    runs = runs.assign(final_test_acc=pd.to_numeric(runs.get("final_test_acc", np.nan)))
    return (
        runs.groupby(keys, sort=False, dropna=False)
        .agg(
            mean=("final_test_acc", "mean"),
            std=("final_test_acc", "std"),
            n=("run_dir", "count"),
            val=("final_val_acc", "mean"),
            **{c: (c, "mean") for c in extra},
        )
        .reset_index()
        .fillna({"std": 0.0})
    )


def choose(table: pd.DataFrame, within=(), among=None) -> pd.DataFrame:
    """`table` with a column `chosen`: per group of `within`, the row of highest `val` among the rows
    where `among` is true (all by default), the first on a tie. The rule of the module docstring."""
    candidates = table if among is None else table[among]
    groups = candidates.groupby(list(within), sort=False) if within else [((), candidates)]
    best = [group["val"].idxmax() for _, group in groups if group["val"].notna().any()]
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
    """`val` of every (lr, weight_decay) of notebook 01's search (or 02's, 04's: FEDAVG_, SPARSE_LR_SEARCH);
    `chosen`: the pair kept."""
    runs = _runs(root, experiment).sort_values(["lr", "weight_decay"], kind="stable")
    return choose(mean_std(runs, ["lr", "weight_decay"]))


def centralized_table(root) -> pd.DataFrame:
    """Notebook 01, per scheduler at the chosen lr: test accuracy, `val`, `chosen` (the best scheduler)
    and epochs_to_99, the first epoch whose seed-mean test accuracy reaches 99 % of its final value."""
    runs = _runs(root, CENTRALIZED)
    mean = _curves(runs, ["scheduler"]).groupby(["scheduler", "epoch"])["test_acc"].mean().dropna()
    return choose(mean_std(runs, ["scheduler"])).assign(
        epochs_to_99=lambda t: [mean[s].index[mean[s] >= 0.99 * mean[s].iloc[-1]][0] for s in t["scheduler"]]
    )


def _reference(root) -> pd.DataFrame:
    """Notebook 02's reference: the centralized cosine runs at the chosen lr and weight decay."""
    return _runs(root, CENTRALIZED).query("scheduler == 'cosine'").assign(method="centralized (cosine)")


def sample_curves(root) -> pd.DataFrame:
    """Test loss and accuracy of FedAvg (iid) and of the centralized reference against images processed.

    A FedAvg round processes m*J*B images (m = max(1, round(C*K)) clients, J steps of B images); a
    centralized epoch the train split once. Without notebook 00 or 01 results, FedAvg alone.
    """
    fed = load_curves(root, FEDAVG_IID, ["seed", "participation", "num_clients", "local_steps", "batch_size"])
    clients = np.maximum(1, np.round(fed["participation"] * fed["num_clients"]))
    fed["samples"] = fed["round"] * clients * fed["local_steps"] * fed["batch_size"]
    fed["method"] = "FedAvg (iid)"
    with contextlib.suppress(NoResults, ValueError):  # no centralized run, no cosine run (nothing to concat)
        central = _curves(_reference(root), ["seed", "method"])
        central["samples"] = central["epoch"] * split_table(root).set_index("split").loc["train", "images"]
        fed = pd.concat([central, fed], ignore_index=True)
    return fed.dropna(subset=["test_acc"])


def fedavg_table(root) -> pd.DataFrame:
    """Notebook 02: the centralized reference and FedAvg (iid), test accuracy over seeds, and each one's
    seed-mean test accuracy (acc_at_budget) at `budget`, the most images both processed (interpolated)."""
    curves = sample_curves(root)
    mean = curves.groupby(["method", "samples"])["test_acc"].mean()
    budget = curves.groupby("method")["samples"].max().min()
    reference = [_reference(root)] if curves["method"].nunique() > 1 else []  # FedAvg alone without one
    runs = pd.concat([*reference, _runs(root, FEDAVG_IID).assign(method="FedAvg (iid)")], ignore_index=True)
    table = mean_std(runs, ["method"]).assign(budget=budget)
    return table.assign(acc_at_budget=[np.interp(budget, mean[m].index, mean[m]) for m in table["method"]])


def late_gain(root) -> str:
    """Notebook 02: how much the seed-mean validation accuracy of FedAvg (iid) rose over the last 20 % of
    rounds (from the last evaluation at or before 80 % of the rounds to the end), as a sentence."""
    mean = load_curves(root, FEDAVG_IID).dropna(subset=["val_acc"]).groupby("round")["val_acc"].mean()
    start = mean[mean.index <= 0.8 * mean.index[-1]].tail(1)
    return (
        (
            f"FedAvg (iid): validation accuracy {(mean.iloc[-1] - start.sum()) * 100:+.2f} points from round "
            f"{start.index.max()} to {mean.index[-1]} (seed mean; the last point is the full split, earlier "
            "ones the evaluation subset)"
        )
        if len(start)
        else "FedAvg (iid): too few evaluations"
    )


def heterogeneity_table(root) -> pd.DataFrame:
    """Notebook 03: test accuracy over seeds per sharding and local steps J."""
    return mean_std(_runs(root, HETEROGENEITY), ["sharding_label", "local_steps"])


def drift_table(root, experiment=HETEROGENEITY) -> pd.DataFrame:
    """Per run: the drift and interference diagnostics averaged over rounds, with the run's labels.

    update_efficiency = ||average delta|| / mean ||client delta||: 1 when the clients agree, about
    1/sqrt(m) when their m deltas are orthogonal.
    """
    runs = _runs(root, experiment)
    drift = _curves(runs, []).groupby("run_dir")[DRIFT].mean()
    drift["update_efficiency"] = drift["avg_delta_norm"] / drift["mean_client_delta_norm"]
    return runs[["run_dir", "seed", "sharding_label", "local_steps", "rule", "sparsity"]].merge(
        drift.reset_index(), on="run_dir"
    )


def sparse_table(root) -> pd.DataFrame:
    """Notebook 04, per sharding, method, sparsity and calibration rounds: test accuracy over seeds,
    `val`, the last calibration round's Fisher threshold (seed mean), and
    `chosen`, the best sparse setting per sharding. The dense references run the same rounds: FedAvg,
    the frozen step-0 head with a dense backbone, and the head alone ('head only') where it ran."""
    runs = pd.concat([_runs(root, SPARSE_FL), load_runs(root, HEAD_ONLY)], ignore_index=True)
    thresholds = runs.get("thresholds", runs["seed"])  # a list per sparse run: one threshold per round
    runs["threshold"] = [t[-1] if isinstance(t, list) and t else np.nan for t in thresholds]
    table = mean_std(runs, ["sharding_label", "method", "sparsity", "calibration_rounds"], ["threshold"])
    return choose(table, ["sharding_label"], among=table["method"] == "sparse")


def sparse_central_table(root) -> pd.DataFrame:
    """Notebook 04: centralized sparse fine-tuning, test accuracy over seeds per sparsity and R."""
    return mean_std(_runs(root, SPARSE_CENTRAL), ["sparsity", "calibration_rounds"])


def rules_table(root) -> pd.DataFrame:
    """Notebook 05, per sharding, sparsity and mask rule (least-sensitive first): test accuracy over
    seeds and `chosen`, the best rule per sharding and sparsity."""
    table = mean_std(_runs(root, MASK_RULES), ["sharding_label", "sparsity", "rule"])
    return choose(table, ["sharding_label", "sparsity"])


def interference_table(root) -> pd.DataFrame:
    """Notebook 05: drift_table's diagnostics per sharding, sparsity and rule, averaged over seeds."""
    drift = drift_table(root, MASK_RULES).drop(columns=["run_dir", "local_steps"])
    return drift.groupby(["sharding_label", "sparsity", "rule"], sort=False).mean().reset_index()


def mask_runs(root) -> pd.DataFrame:
    """Notebook 05's iid runs at its smallest sparsity and seed: the runs whose masks are compared."""
    runs = _runs(root, MASK_RULES).query("sharding_label == 'iid'")
    return runs[(runs["sparsity"] == runs["sparsity"].min()) & (runs["seed"] == runs["seed"].min())]


def _rule_masks(root) -> dict:
    """rule -> {parameter name: bool mask} of the mask_runs."""
    return {
        run.rule: unpack_masks(torch.load(Path(run.run_dir, "prepared.pt"), weights_only=True)["masks"])
        for run in mask_runs(root).itertuples()
    }


def mask_overlap_table(root) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of the rules' trainable sets (1 when both are empty), per
    pair of rules, for notebook 05's iid runs at its smallest sparsity and seed."""
    masks = _rule_masks(root)
    return pd.DataFrame([[jaccard(masks[a], masks[b]) for b in masks] for a in masks], [*masks], [*masks])


def block_density_table(root) -> pd.DataFrame:
    """Per rule and transformer block (-1: parameters outside the blocks), entries and the trainable
    fraction, for notebook 05's iid runs at its smallest sparsity and seed."""
    rows = pd.concat([mask_density_by_parameter(m).assign(rule=r) for r, m in _rule_masks(root).items()])
    table = rows.groupby(["rule", "block"], sort=False)[["entries", "trainable"]].sum().reset_index()
    return table.assign(density=table["trainable"] / table["entries"])


# --------------------------------------------------------------------------- figure helpers


def _axes(ncols: int = 1, **kwargs):
    """The one theme, and a row of `ncols` axes (constrained layout keeps outside legends in the figure)."""
    sns.set_theme(
        context="paper",
        style="whitegrid",
        palette="colorblind",
        font_scale=0.9,
        rc={
            "pdf.fonttype": 42,
            "legend.frameon": False,
            "savefig.dpi": 200,  # 42: TrueType
            "axes.titlesize": "medium",
            "figure.titlesize": "medium",
        },
    )
    fig, axes = plt.subplots(1, ncols, squeeze=False, layout="constrained", **kwargs)
    return fig, axes[0]


def _pretty(label) -> str:
    """A sharding label for display: 'Nc=5' -> '$N_c$=5'."""
    return str(label).replace("Nc=", "$N_c$=")


def placeholder(title: str, message: str):
    """A hatched stand-in for a figure (give it that figure's size), so the layout stays and the gap shows."""
    fig, (ax,) = _axes()
    ax.set_axis_off()
    ax.add_patch(
        plt.Rectangle(
            (0, 0),
            1,
            1,
            transform=ax.transAxes,
            facecolor="#fff8e1",
            edgecolor="#d39e00",
            hatch="//",
            alpha=0.5,
        )
    )
    ax.text(
        0.5,
        0.5,
        f"{title}\n{message}",
        ha="center",
        va="center",
        fontsize=7,
        wrap=True,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#d39e00"},
    )
    return fig


def _figure(width: float, aspect: float, title: str):
    """Decorates draw(root, profile) -> (figure, seeds): sets the size (width inches, height width *
    aspect, also `function.size`), the legend right of the last panel and a title naming the profile and
    the seed count; a placeholder of that size when the results are missing. In a worker's notebook, the
    runs of its grids not complete yet (team.PENDING) are named in red below the plot."""

    def wrap(draw):
        @functools.wraps(draw)
        def figure(root, profile: str):
            try:
                fig, seeds = draw(root, profile)
                fig.suptitle(f"{title} (profile {profile}, {seeds} seed{'s' if seeds != 1 else ''})")
                if pending := [name.rsplit("-", 1)[0] for names in team.PENDING.values() for name in names]:
                    fig.text(
                        0,
                        0,
                        f"Not drawn, not complete yet ({len(pending)} runs): {', '.join(pending)}",
                        fontsize=5,
                        color="crimson",
                        va="top",
                        wrap=True,
                    )
            except NoResults as missing:
                fig = placeholder(f"{title}: no results yet (profile {profile})", str(missing))
            if fig.axes[-1].get_legend() is not None:
                sns.move_legend(
                    fig.axes[-1],
                    "center left",
                    bbox_to_anchor=(1.02, 0.5),
                    fontsize="x-small",
                    title_fontsize="x-small",
                )
            fig.set_size_inches(width, width * aspect)
            return fig

        figure.size = (width, aspect)
        return figure

    return wrap


def save(fig, stem) -> None:
    """<stem>.pdf (TrueType fonts embedded) and <stem>.png."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".pdf", ".png"):
        fig.savefig(Path(stem).with_suffix(suffix))


def _lines(panels: list, x: str, xlabel: str, hue: str):
    """A panel per (title, curves, y, ylabel): the seed mean of y against x with a +-1 std band, a line
    per `hue`. Accuracies (columns ending in _acc) are drawn in percent."""
    fig, axes = _axes(len(panels))
    for ax, (title, curves, y, ylabel) in zip(axes, panels):
        curves = curves.dropna(subset=[y]).assign(y=curves[y] * (100 if y.endswith("_acc") else 1))
        sns.lineplot(data=curves, x=x, y="y", hue=hue, errorbar="sd", ax=ax, legend=ax is axes[-1])
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig, panels[0][1]["seed"].nunique()


def _loss_and_accuracy(curves: pd.DataFrame) -> list:
    return [("", curves, "test_loss", "test loss"), ("", curves, "test_acc", "test accuracy (%)")]


# --------------------------------------------------------------------------- figures


@_figure(FULL, 0.32, "Client shards")
def shard_figure(root, profile: str):
    """Notebook 00: samples and distinct classes per client, per sharding scheme (the shards of one seed)."""
    stats = read_csv(root, "shard_stats.csv").assign(scheme=lambda s: s["scheme"].map(_pretty))
    fig, axes = _axes(2)
    for ax, column in zip(axes, ("samples", "classes")):
        sns.boxplot(data=stats, x="scheme", y=column, ax=ax, fliersize=1, linewidth=0.7)
        ax.set(xlabel="", ylabel=f"{column} per client")
    return fig, 1


@_figure(COLUMN, 0.8, "LR search")
def lr_search_heatmap(root, profile: str):
    """Notebook 01: validation accuracy (%) of every (learning rate, weight decay) pair of the search."""
    table = lr_search_table(root)
    fig, (ax,) = _axes()
    sns.heatmap(
        table.pivot(index="lr", columns="weight_decay", values="val") * 100,
        annot=True,
        fmt=".1f",
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "val. accuracy (%)"},
        annot_kws={"fontsize": 7},
    )
    ax.set(xlabel="weight decay", ylabel="learning rate")
    return fig, table["n"].max()


@_figure(FULL, 0.36, "Centralized")
def centralized_curves(root, profile: str):
    """Notebook 01: test loss and accuracy per epoch, a line per scheduler, at the chosen lr."""
    curves = _curves(_runs(root, CENTRALIZED), ["scheduler", "seed"])
    return _lines(_loss_and_accuracy(curves), "epoch", "epoch", "scheduler")


@_figure(FULL, 0.36, "FedAvg vs centralized")
def fedavg_vs_centralized(root, profile: str):
    """Notebook 02: FedAvg (iid) and the centralized reference against training images processed."""
    curves = sample_curves(root)
    return _lines(
        _loss_and_accuracy(curves.assign(thousands=curves["samples"] / 1000)),
        "thousands",
        "training images processed (thousands)",
        "method",
    )


@_figure(COLUMN, 0.8, "FedAvg")
def heterogeneity_heatmap(root, profile: str):
    """Notebook 03: final test accuracy (%), mean and std over seeds, per sharding (rows) and J (columns)."""
    table = heterogeneity_table(root)
    table["text"] = [f"{m * 100:.1f}\n±{s * 100:.1f}" for m, s in zip(table["mean"], table["std"])]
    grid = table.pivot(index="sharding_label", columns="local_steps", values=["mean", "text"])
    grid = grid.reindex(table["sharding_label"].unique()).rename(index=_pretty)
    fig, (ax,) = _axes()
    sns.heatmap(
        grid["mean"].astype(float) * 100,
        annot=grid["text"].to_numpy(),
        fmt="",
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "test accuracy (%)"},
        annot_kws={"fontsize": 7},
    )
    ax.set(xlabel="local steps J", ylabel="sharding")
    ax.tick_params(axis="y", rotation=0)
    return fig, table["n"].max()


@_figure(FULL, 0.3, "FedAvg under heterogeneity")
def heterogeneity_curves(root, profile: str):
    """Notebook 03: test accuracy per round, a panel per J, a line per sharding."""
    curves = load_curves(root, HETEROGENEITY, ["seed", "local_steps", "sharding_label"])
    curves["sharding"] = curves["sharding_label"].map(_pretty)
    return _lines(
        [
            (f"J = {j}", curves[curves["local_steps"] == j], "test_acc", "test accuracy (%)")
            for j in sorted(curves["local_steps"].unique())
        ],
        "round",
        "round",
        "sharding",
    )


@_figure(FULL, 0.28, "Client drift and interference")
def drift_figure(root, profile: str):
    """Notebook 03: drift and interference averaged over rounds, per sharding, a line per J; bars: std."""
    drift = drift_table(root)
    drift = drift.assign(sharding=drift["sharding_label"].map(_pretty), J=drift["local_steps"])
    panels = {
        "mean_pairwise_cosine": "mean pairwise cosine",
        "sign_agreement": "sign agreement",
        "mean_client_delta_norm": "client delta norm (L2)",
        "update_efficiency": "update efficiency",
    }
    fig, axes = _axes(len(panels))
    for ax, (column, label) in zip(axes, panels.items()):
        sns.pointplot(
            data=drift,
            x="sharding",
            y=column,
            hue="J",
            errorbar="sd",
            ax=ax,
            markersize=3,
            dodge=0.3 if drift["J"].nunique() > 1 else False,  # seaborn divides by levels - 1
            linewidth=1,
            palette="colorblind",
            legend=ax is axes[-1],
        )
        ax.set(xlabel="", ylabel=label)
        ax.tick_params(axis="x", rotation=45)
    return fig, drift["seed"].nunique()


@_figure(FULL, 0.32, "Sparse FedAvg, iid")
def sparsity_figure(root, profile: str):
    """Notebook 04, iid shards: final test accuracy against sparsity (at the default R) and against the
    calibration rounds R (at the default sparsity), least-sensitive masks; the dense references of the same
    rounds as horizontal lines; bars: std over seeds."""
    table = sparse_table(root)
    rows = table[table["sharding_label"] == "iid"]
    fig, axes = _axes(2, sharey=True)
    for ax, (column, group) in zip(axes, sweeps(rows).items()):
        group = group.sort_values(column)
        ax.errorbar(
            group[column],
            group["mean"] * 100,
            yerr=group["std"] * 100,
            marker="o",
            markersize=3,
            capsize=2,
            label="sparse (least sensitive)",
        )
        for (_, ref), style in zip(rows[rows["method"] != "sparse"].iterrows(), (":", "-.", "--", "-")):
            ax.axhline(ref["mean"] * 100, color="0.4", linewidth=0.8, linestyle=style, label=ref["method"])
        ax.set_xscale("logit" if column == "sparsity" else "log")  # logit: 0.9, 0.99 evenly spaced
        ax.set_xticks(levels := sorted(group[column].unique()), [f"{v:g}" for v in levels])
        ax.minorticks_off()
        ax.set(
            xlabel="sparsity (fraction frozen)" if column == "sparsity" else "calibration rounds R",
            ylabel="test accuracy (%)",
        )
    axes[-1].legend()
    return fig, table["n"].max()


@_figure(FULL, 0.3, "Mask calibration rules")
def mask_rules_figure(root, profile: str):
    """Notebook 05: final test accuracy (%) per mask rule, a panel per sparsity, a bar per sharding;
    bars: std over seeds."""
    runs = _runs(root, MASK_RULES)
    runs = runs.assign(
        test_acc=runs["final_test_acc"] * 100,
        sharding=runs["sharding_label"].map(_pretty),
        rule=runs["rule"].str.replace("_", "\n"),
    )
    sparsities = sorted(runs["sparsity"].unique())
    fig, axes = _axes(len(sparsities), sharey=True)
    for ax, sparsity in zip(axes, sparsities):
        sns.barplot(
            data=runs[runs["sparsity"] == sparsity],
            x="rule",
            y="test_acc",
            hue="sharding",
            order=[r.replace("_", "\n") for r in RULES],
            errorbar="sd",
            capsize=0.1,
            ax=ax,
            err_kws={"linewidth": 0.8},
            legend=ax is axes[-1],
        )
        ax.set(title=f"sparsity {sparsity:g}", xlabel="", ylabel="test accuracy (%)")
    return fig, runs["seed"].nunique()


@_figure(COLUMN, 0.8, "Mask overlap, iid")
def mask_overlap_heatmap(root, profile: str):
    """Notebook 05: Jaccard overlap of the rules' trainable sets (iid, smallest sparsity and seed)."""
    overlap = mask_overlap_table(root)
    names = [r.replace("_sensitive", " sens.").replace("est_magnitude", ". mag.") for r in overlap.index]
    fig, (ax,) = _axes()
    sns.heatmap(
        pd.DataFrame(overlap.to_numpy(), names, names),
        annot=True,
        fmt=".2f",
        vmin=0,
        vmax=1,
        ax=ax,
        cmap="rocket_r",
        cbar_kws={"label": "Jaccard overlap"},
        annot_kws={"fontsize": 7},
    )
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    return fig, 1


@_figure(COLUMN, 0.75, "Density per block, iid")
def block_density_figure(root, profile: str):
    """Notebook 05: trainable fraction per transformer block, a line per rule (iid, one sparsity and seed)."""
    density = block_density_table(root)
    fig, (ax,) = _axes()
    sns.lineplot(
        data=density.assign(rule=density["rule"].str.replace("_", " ")),
        x="block",
        y="density",
        hue="rule",
        marker="o",
        markersize=3,
        ax=ax,
    )
    ax.set(
        xlabel="transformer block (-1: outside)",
        ylabel="trainable fraction",
        ylim=(0, None),
        xticks=sorted(density["block"].unique()),
    )
    return fig, 1
