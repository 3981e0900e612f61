"""Results -> figures: one function per figure of the report, drawn from the tables of `results`.

    fig = heterogeneity_heatmap("results/full", "full")   # a matplotlib Figure

Every function takes the results root of one profile (<results_dir>/<profile>) and the profile, which
its title names with the seed count. The experiment notebooks call these right after their runs, and
report.write_report calls the same functions. When the experiment a figure needs has no complete run
(results.NoResults), the figure is a hatched placeholder of its own size instead.

One seaborn theme (paper context, colour-blind palette), sized for the report's column (COLUMN inches)
or its full width (FULL), PDFs with embedded TrueType fonts.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from . import team
from .experiments import (
    CENTRALIZED,
    HETEROGENEITY,
    MASK_RULES,
    REMEDIES,
    sweeps,
)
from .masks import RULES
from .results import (
    NoResults,
    block_density_table,
    complete_runs,
    drift_table,
    heterogeneity_table,
    load_curves,
    lr_search_table,
    mask_overlap_table,
    read_csv,
    sample_curves,
    sparse_table,
    val_curves,
)

COLUMN, FULL = 3.3, 6.9  # inches: one column of the report, both columns


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
    """Decorates draw(root) -> (figure, seeds) into figure(root, profile): sets the size (width inches,
    height width * aspect, also `function.size`), the legend right of the last panel and a title naming
    the profile and the seed count; a placeholder of that size when the results are missing. In a
    worker's notebook, the runs of its grids not complete yet (team.PENDING) are named in red below the
    plot."""

    def wrap(draw):
        @functools.wraps(draw)
        def figure(root, profile: str):
            try:
                fig, seeds = draw(root)
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
            if fig.axes[-1].get_legend():
                sns.move_legend(
                    fig.axes[-1],
                    "center left",
                    bbox_to_anchor=(1.02, 0.5),
                    fontsize="x-small",
                    title_fontsize="x-small",
                )
            fig.set_size_inches(width, width * aspect)
            return fig

        del figure.__wrapped__  # so that help() shows figure's (root, profile), not draw's (root)
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


def _heatmap(grid: pd.DataFrame, label: str, ax=None, **kwargs):
    """A heatmap of `grid` on `ax` (default: a new figure's one axes), its cells annotated in small type,
    its colour bar labelled `label`."""
    if ax is None:
        _, (ax,) = _axes()
    sns.heatmap(grid, ax=ax, cbar_kws={"label": label}, annot_kws={"fontsize": 7}, **kwargs)
    return ax.figure, ax


def _accuracy_bars(runs: pd.DataFrame, x: str, ax, **options) -> None:
    """Final test accuracy (%) of `runs` per `x` on `ax`, a bar per sharding; bars: std over seeds.
    options: more of seaborn's barplot (order, legend)."""
    data = runs.assign(test_acc=runs["final_test_acc"] * 100, sharding=runs["sharding_label"].map(_pretty))
    sns.barplot(
        data=data,
        x=x,
        y="test_acc",
        hue="sharding",
        errorbar="sd",
        capsize=0.1,
        ax=ax,
        err_kws={"linewidth": 0.8},
        **options,
    )
    ax.set(xlabel="", ylabel="test accuracy (%)")


def _loss_and_accuracy(curves: pd.DataFrame) -> list:
    """The validation loss and accuracy panels: curves on the full validation split (results.val_curves)."""
    return [("", curves, "val_loss", "validation loss"), ("", curves, "val_acc", "validation accuracy (%)")]


# --------------------------------------------------------------------------- figures


@_figure(FULL, 0.32, "Client shards")
def shard_figure(root):
    """Notebook 00: samples and distinct classes per client, per sharding scheme (the shards of one seed)."""
    stats = read_csv(root, "shard_stats.csv").assign(scheme=lambda s: s["scheme"].map(_pretty))
    fig, axes = _axes(2)
    for ax, column in zip(axes, ("samples", "classes")):
        sns.boxplot(data=stats, x="scheme", y=column, ax=ax, fliersize=1, linewidth=0.7)
        ax.set(xlabel="", ylabel=f"{column} per client")
    return fig, 1


@_figure(COLUMN, 0.8, "LR search")
def lr_search_heatmap(root):
    """Notebook 01: validation accuracy (%) of every (learning rate, weight decay) pair of the search, a
    panel per scheduler, its own choice starred; one colour scale."""
    table = lr_search_table(root)
    table["text"] = [f"{v * 100:.1f}{'*' * c}" for v, c in zip(table["val"], table["chosen"])]
    panels = table.assign(scheduler=table.get("scheduler", "")).groupby("scheduler", sort=False)
    fig, axes = _axes(panels.ngroups, sharey=True)
    scale = {"vmin": table["val"].min() * 100, "vmax": table["val"].max() * 100, "cmap": "viridis"}
    for ax, (scheduler, group) in zip(axes, panels):
        grid = group.pivot(index="lr", columns="weight_decay", values=["val", "text"])
        text = grid["text"].to_numpy()
        _heatmap(
            grid["val"].astype(float) * 100,
            "val. accuracy (%)",
            ax,
            annot=text,
            fmt="",
            cbar=ax is axes[-1],
            **scale,
        )
        ax.set(title=scheduler, xlabel="weight decay", ylabel="learning rate" if ax is axes[0] else "")
    return fig, table["n"].max()


@_figure(FULL, 0.36, "Centralized")
def centralized_curves(root):
    """Notebook 01: validation loss and accuracy per epoch, a line per scheduler at its own lr, from the
    runs evaluated on the full validation split at every point (results.val_curves)."""
    curves = val_curves(complete_runs(root, CENTRALIZED), ["scheduler", "seed"])
    return _lines(_loss_and_accuracy(curves), "epoch", "epoch", "scheduler")


@_figure(FULL, 0.36, "FedAvg vs centralized")
def fedavg_vs_centralized(root):
    """Notebook 02: validation loss and accuracy of FedAvg (iid) and the centralized reference against
    training images processed (results.sample_curves)."""
    curves = sample_curves(root)
    return _lines(
        _loss_and_accuracy(curves.assign(thousands=curves["images"] / 1000)),
        "thousands",
        "training images processed (thousands)",
        "method",
    )


@_figure(COLUMN, 0.8, "FedAvg")
def heterogeneity_heatmap(root):
    """Notebook 03: final test accuracy (%), mean and std over seeds, per sharding (rows) and J (columns)."""
    table = heterogeneity_table(root)
    table["text"] = [f"{m * 100:.1f}\n±{s * 100:.1f}" for m, s in zip(table["mean"], table["std"])]
    grid = table.pivot(index="sharding_label", columns="local_steps", values=["mean", "text"])
    grid = grid.reindex(table["sharding_label"].unique()).rename(index=_pretty)
    accuracy = grid["mean"].astype(float) * 100
    fig, ax = _heatmap(accuracy, "test accuracy (%)", annot=grid["text"].to_numpy(), fmt="", cmap="viridis")
    ax.set(xlabel="local steps J", ylabel="sharding")
    ax.tick_params(axis="y", rotation=0)
    return fig, table["n"].max()


@_figure(FULL, 0.3, "FedAvg under heterogeneity")
def heterogeneity_curves(root):
    """Notebook 03: test accuracy per round, a panel per J, a line per sharding."""
    curves = load_curves(root, HETEROGENEITY, ["seed", "local_steps", "sharding_label"])
    curves["sharding"] = curves["sharding_label"].map(_pretty)
    return _lines(
        [(f"J = {j}", group, "test_acc", "test accuracy (%)") for j, group in curves.groupby("local_steps")],
        "round",
        "round",
        "sharding",
    )


@_figure(FULL, 0.28, "Client drift and interference")
def drift_figure(root):
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
def sparsity_figure(root):
    """Notebook 04, iid shards: final test accuracy against sparsity (at the default R) and against the
    calibration rounds R (at the default sparsity), least-sensitive masks, each point labelled with the
    share of steps the clip scaled down; the dense references of the same rounds as horizontal lines;
    bars: std over seeds."""
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
        for x, y, clipped in zip(group[column], group["mean"] * 100, group["clip_fraction"]):
            ax.annotate(f"{clipped:.0%}", (x, y), (3, 3), textcoords="offset points", fontsize=5)
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
def mask_rules_figure(root):
    """Notebook 05: final test accuracy (%) per mask rule, a panel per sparsity, a bar per sharding;
    bars: std over seeds."""
    runs = complete_runs(root, MASK_RULES)
    runs = runs.assign(rule=runs["rule"].str.replace("_", "\n"))
    panels = runs.groupby("sparsity")  # in ascending sparsity
    fig, axes = _axes(panels.ngroups, sharey=True)
    for ax, (sparsity, group) in zip(axes, panels):
        order = [r.replace("_", "\n") for r in RULES]
        _accuracy_bars(group, "rule", ax, order=order, legend=ax is axes[-1])
        ax.set(title=f"sparsity {sparsity:g}")
    return fig, runs["seed"].nunique()


@_figure(COLUMN, 0.8, "Mask overlap, iid")
def mask_overlap_heatmap(root):
    """Notebook 05: Jaccard overlap of the rules' trainable sets (iid, smallest sparsity and seed)."""
    overlap = mask_overlap_table(root)
    names = overlap.index.str.replace("_sensitive", " sens.").str.replace("est_magnitude", ". mag.")
    grid = pd.DataFrame(overlap.to_numpy(), names, names)
    fig, ax = _heatmap(grid, "Jaccard overlap", annot=True, fmt=".2f", vmin=0, vmax=1, cmap="rocket_r")
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    return fig, 1


@_figure(COLUMN, 0.75, "Density per block, iid")
def block_density_figure(root):
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


@_figure(FULL, 0.3, "Remedies for heterogeneity")
def remedies_figure(root):
    """Notebook 06: final test accuracy (%) per method, a bar per sharding (iid: the reference); bars: std
    over seeds."""
    runs = complete_runs(root, REMEDIES)
    fig, (ax,) = _axes()
    _accuracy_bars(runs.assign(method=runs["method"].str.replace(" (", "\n(")), "method", ax)
    return fig, runs["seed"].nunique()


@_figure(FULL, 0.3, "Remedies against rounds")
def remedy_curves(root):
    """Notebook 06, per non-iid sharding: test accuracy at the evaluated rounds (the evaluation subset
    before the last) and the sign agreement of every round's client deltas before the merge (graded:
    the share of moved entries moved both ways is near 1 for every dense method), a line per method;
    bands: std over seeds."""
    curves = load_curves(root, REMEDIES, ["seed", "method", "sharding_label"])
    panels = []
    for label, group in curves[curves["sharding_label"] != "iid"].groupby("sharding_label", sort=False):
        panels.append((_pretty(label), group, "test_acc", "test accuracy (%)"))
        panels.append((_pretty(label), group, "sign_agreement", "sign agreement"))
    if not panels:
        raise NoResults(f"no non-iid run of {REMEDIES} under {root}")
    return _lines(panels, "round", "round", "method")
