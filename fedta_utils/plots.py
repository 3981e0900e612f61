"""Figures: one theme for the notebooks and the report.

seaborn 'paper' context, colour-blind palette, sizes that fit the report's
column (3.3 in) or full width (6.9 in), PDFs with embedded TrueType fonts
(pdf.fonttype 42) plus a PNG beside each for quick viewing. Every figure's
title or caption names the profile and the number of seeds, so smoke numbers
are never mistaken for real ones. Curves are drawn as the mean over seeds
with a band of one standard deviation.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import EngFormatter, MaxNLocator, NullLocator

COLUMN_WIDTH = 3.3  # inches, one column of the report
FULL_WIDTH = 6.9    # inches, both columns
ASPECT = 0.72


def use_theme() -> None:
    """The one theme every figure uses."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=0.9)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.bbox": "tight",
                         "figure.dpi": 120, "savefig.dpi": 200, "legend.frameon": False})


def figure(width: float = COLUMN_WIDTH, aspect: float = ASPECT, ncols: int = 1, nrows: int = 1, **kwargs):
    """A themed figure `width` inches wide and `width * aspect` tall; axes always 2-D."""
    use_theme()
    return plt.subplots(nrows, ncols, figsize=(width, width * aspect), squeeze=False, **kwargs)


def save(fig, stem: str | Path) -> list[Path]:
    """Write <stem>.pdf (fonts embedded) and <stem>.png; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    for path in paths:
        fig.savefig(path)
    return paths


def provenance(profile: str, seeds: int) -> str:
    """The label every figure carries: which profile and how many seeds."""
    return f"profile: {profile}, {seeds} seed{'s' if seeds != 1 else ''}"


def pretty(label) -> str:
    """A sharding label for display: 'Nc=5' -> '$N_c$=5', 'Dir(alpha=0.1)' -> 'Dir($\\alpha$=0.1)'."""
    return str(label).replace("Nc=", "$N_c$=").replace("alpha=", "$\\alpha$=")


def hue_order(values) -> list:
    """Numbers in increasing order; labels in order of first appearance (the caller's order, e.g. iid first)."""
    unique = list(dict.fromkeys(v for v in values if not pd.isna(v)))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in unique)
    return sorted(unique) if numeric else unique


def legend_right(fig, ax=None, title: str | None = None) -> None:
    """One legend for the whole figure, right of the panels, so it never hides a curve.

    Collects the labelled artists of every panel (each label once) and lays
    the panels out in the width the legend leaves. `ax` is accepted for
    symmetry with Axes.legend; every panel is searched.
    """
    entries = {}
    for panel in fig.axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(label, handle)
        if panel.get_legend() is not None:
            panel.get_legend().remove()
    if not entries:
        fig.tight_layout()
        return
    legend = fig.legend(list(entries.values()), list(entries), title=title, loc="center right",
                        fontsize="x-small", title_fontsize="x-small")
    fig.canvas.draw()  # the legend's size is known only once drawn
    share = legend.get_window_extent().width / fig.bbox.width
    fig.tight_layout(rect=(0, 0, 1 - share - 0.01, 1))


# --------------------------------------------------------------------------- curves

def mean_curves(ax, frame: pd.DataFrame, x: str, y: str, hue: str, label_format: str = "{}") -> None:
    """Mean over seeds of `y` against `x`, one line per `hue` value, with a +-1 std band."""
    frame = frame.dropna(subset=[y])
    for index, key in enumerate(hue_order(frame[hue])):
        stats = frame[frame[hue] == key].groupby(x)[y].agg(["mean", "std"]).reset_index()
        color = sns.color_palette("colorblind")[index % 10]
        ax.plot(stats[x], stats["mean"], color=color, label=pretty(label_format.format(key)))
        ax.fill_between(stats[x], stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                        color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if np.allclose(frame[x], np.round(frame[x])):  # epochs, rounds: no fractional ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def count_axis(fig, axis: str = "x") -> None:
    """Large counts (e.g. images processed) as 200k, 1.5M instead of an offset exponent."""
    for ax in fig.axes:
        getattr(ax, f"{axis}axis").set_major_formatter(EngFormatter(sep=""))


def legend_below(fig, ax, ncol: int = 3) -> None:
    """The legend of a one-column figure under its axes, so it never hides a line."""
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=ncol, fontsize="x-small")


def curves_figure(frame: pd.DataFrame, x: str, ys: list[str], hue: str, xlabel: str, ylabels: list[str],
                  title: str, label_format: str = "{}", width: float = FULL_WIDTH):
    """Side-by-side panels of mean curves (e.g. test loss and test accuracy)."""
    fig, axes = figure(width, aspect=0.36 if len(ys) > 1 else ASPECT, ncols=len(ys))
    for ax, y, ylabel in zip(axes[0], ys, ylabels):
        mean_curves(ax, frame, x, y, hue, label_format)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize="medium")
    legend_right(fig, axes[0][-1], title=hue)
    return fig


# --------------------------------------------------------------------------- grids and bars

def heatmap(table: pd.DataFrame, title: str, cbar_label: str, fmt: str = ".1f", annotations=None,
            width: float = COLUMN_WIDTH, cmap: str = "viridis"):
    """A labelled heatmap of a 2-D table (rows x columns); `annotations` overrides the cell text."""
    fig, axes = figure(width, aspect=0.8)
    ax = axes[0][0]
    custom = annotations is not None
    sns.heatmap(table, annot=annotations if custom else True, fmt="" if custom else fmt,
                cmap=cmap, cbar_kws={"label": cbar_label}, ax=ax, annot_kws={"fontsize": 7})
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return fig


def mean_std_bars(table: pd.DataFrame, category: str, group: str, title: str, ylabel: str,
                  width: float = FULL_WIDTH):
    """Grouped bars of `mean` with +-`std` error bars: categories on x, one bar per group."""
    fig, axes = figure(width, aspect=0.35)
    ax = axes[0][0]
    grouped_bars(ax, table, category, group)
    ax.set_ylabel(ylabel)
    ax.legend(title=group, fontsize="small")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return fig


def grouped_bars(ax, table: pd.DataFrame, category: str, group: str, wrap_labels: bool = False) -> None:
    """Bars of `mean` +- `std` on `ax`: one cluster per `category`, one colour per `group`."""
    categories = list(dict.fromkeys(table[category]))
    groups = list(dict.fromkeys(table[group]))
    bar_width = 0.8 / max(1, len(groups))
    for index, name in enumerate(groups):
        rows = table[table[group] == name].set_index(category).reindex(categories)
        positions = np.arange(len(categories)) + (index - (len(groups) - 1) / 2) * bar_width
        ax.bar(positions, rows["mean"], bar_width, yerr=rows["std"], capsize=2, label=pretty(name),
               color=sns.color_palette("colorblind")[index % 10], error_kw={"linewidth": 0.8})
    separator = "\n" if wrap_labels else " "
    ax.set_xticks(np.arange(len(categories)))
    ax.set_xticklabels([str(c).replace("_", separator) for c in categories])


def placeholder(title: str, message: str, width: float = COLUMN_WIDTH, aspect: float = 0.5):
    """A visible stand-in for a figure whose experiment has no results yet.

    Drawn at the size of the figure it replaces, with a hatched frame, so the
    report's layout stays the same and the gap cannot be overlooked.
    """
    fig, axes = figure(width, aspect=aspect)
    ax = axes[0][0]
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="#fff8e1", edgecolor="#d39e00",
                               hatch="//", linewidth=1.0, alpha=0.5))
    for spine in ax.spines.values():
        spine.set_edgecolor("#d39e00")
    ax.text(0.5, 0.5, f"{title}\n{message}", ha="center", va="center", fontsize=8, wrap=True,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#d39e00"})
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- notebook 00

def shard_statistics_figure(stats: pd.DataFrame, profile: str):
    """Samples and distinct classes per client for every sharding scheme."""
    fig, axes = figure(FULL_WIDTH, aspect=0.32, ncols=2)
    stats = stats.assign(scheme=stats["scheme"].map(pretty))
    order = list(dict.fromkeys(stats["scheme"]))
    sns.boxplot(data=stats, x="scheme", y="samples", order=order, ax=axes[0][0], fliersize=1, linewidth=0.7)
    sns.boxplot(data=stats, x="scheme", y="classes", order=order, ax=axes[0][1], fliersize=1, linewidth=0.7)
    axes[0][0].set_ylabel("samples per client")
    axes[0][1].set_ylabel("classes per client")
    for ax in axes[0]:
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Client shards (K={stats['client'].nunique()}), profile: {profile}", fontsize="medium")
    fig.tight_layout()
    return fig


def label_histograms_figure(histograms: dict, profile: str, clients: int = 20):
    """Class counts of the first `clients` clients, one panel per scheme."""
    fig, axes = figure(FULL_WIDTH, aspect=0.3, ncols=len(histograms))
    for ax, (name, histogram) in zip(axes[0], histograms.items()):
        sns.heatmap(histogram[:clients], ax=ax, cmap="mako_r", cbar=False, xticklabels=False, yticklabels=False)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
    fig.suptitle(f"Label histograms of {clients} clients, profile: {profile}", fontsize="medium")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- notebook 01

def lr_search_figure(search: pd.DataFrame, profile: str):
    """Validation accuracy of every (learning rate, weight decay) pair of the search."""
    table = search.pivot_table(index="lr", columns="weight_decay", values="final_val_acc") * 100
    fig = heatmap(table, f"LR search (validation), profile: {profile}", "val. accuracy (%)")
    ax = fig.axes[0]
    ax.set_xlabel("weight decay")
    ax.set_ylabel("learning rate")
    ax.tick_params(axis="y", rotation=0)
    return fig


# --------------------------------------------------------------------------- notebook 03

def heterogeneity_heatmap(table: pd.DataFrame, profile: str, seeds: int):
    """Final test accuracy (mean +- std) for sharding x J."""
    means = table.pivot(index="sharding_label", columns="local_steps", values="mean") * 100
    stds = table.pivot(index="sharding_label", columns="local_steps", values="std") * 100
    order = list(dict.fromkeys(table["sharding_label"]))
    means, stds = means.reindex(order), stds.reindex(order)
    text = means.map(lambda v: f"{v:.1f}") + "\n±" + stds.map(lambda v: f"{v:.1f}")
    means.index = [pretty(label) for label in means.index]
    fig = heatmap(means, f"FedAvg final test acc. (%), {provenance(profile, seeds)}", "test accuracy (%)",
                  annotations=text.to_numpy())
    fig.axes[0].set_xlabel("local steps J")
    fig.axes[0].set_ylabel("sharding")
    fig.axes[0].tick_params(axis="y", rotation=0)
    return fig


def heterogeneity_curves(curves: pd.DataFrame, profile: str, seeds: int):
    """Test accuracy over rounds, one panel per J, one line per sharding."""
    steps = sorted(curves["local_steps"].unique())
    fig, axes = figure(FULL_WIDTH, aspect=0.3, ncols=len(steps), sharey=True)
    for ax, j in zip(axes[0], steps):
        mean_curves(ax, curves[curves["local_steps"] == j].assign(test_acc=lambda f: f["test_acc"] * 100),
                    "round", "test_acc", "sharding_label")
        ax.set_title(f"J = {j}", fontsize="small")
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle(f"FedAvg under heterogeneity, {provenance(profile, seeds)}", fontsize="medium")
    legend_right(fig, axes[0][-1], title="sharding")
    return fig


def drift_figure(drift: pd.DataFrame, profile: str, seeds: int):
    """Drift/interference diagnostics (averaged over rounds) against sharding, one line per J."""
    panels = [("mean_pairwise_cosine", "mean pairwise cosine"), ("sign_agreement", "sign agreement"),
              ("mean_client_delta_norm", "client delta norm"),
              ("update_efficiency", "update efficiency")]  # ||average delta|| / mean ||client delta||
    fig, axes = figure(FULL_WIDTH, aspect=0.3, ncols=len(panels))
    drift = drift.assign(sharding_label=drift["sharding_label"].map(pretty))
    order = list(dict.fromkeys(drift["sharding_label"]))
    dodge = 0.3 if drift["local_steps"].nunique() > 1 else False  # seaborn divides by (levels - 1)
    for ax, (column, label) in zip(axes[0], panels):
        sns.pointplot(data=drift, x="sharding_label", y=column, hue="local_steps", order=order, ax=ax,
                      errorbar="sd", dodge=dodge, markersize=3, linewidth=1, palette="colorblind")
        ax.set_xlabel("")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45)
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.suptitle(f"Client drift and interference, {provenance(profile, seeds)}", fontsize="medium")
    legend_right(fig, axes[0][-1], title="J")
    return fig


# --------------------------------------------------------------------------- notebooks 04 and 05

def _baseline_lines(ax, table: pd.DataFrame, sharding: str) -> None:
    styles = {"FedAvg": ":", "head only": "-."}
    rows = table[(table["sharding_label"] == sharding) & ~table["method"].str.startswith("sparse")]
    for _, row in rows.iterrows():
        ax.axhline(row["mean"] * 100, color="0.35", linewidth=0.8, linestyle=styles.get(row["method"], "--"),
                   label=row["method"])


def sparsity_ticks(ax, sparsities) -> None:
    """Ticks at the sparsities that were run, the same range on every panel (logit scale)."""
    values = sorted(set(float(v) for v in sparsities.dropna()))
    if not values:
        return
    low, high = min(values), max(values)
    ax.set_xlim(low / 1.5, 1 - (1 - high) / 1.5)  # a margin on the logit scale
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def _sparse_accuracy_panels(table: pd.DataFrame, x: str, lines: str, line_label):
    """One panel per sharding: final test accuracy (mean +- std) against `x`, one line per `lines` value."""
    shardings = list(dict.fromkeys(table["sharding_label"]))
    fig, axes = figure(FULL_WIDTH, aspect=0.32, ncols=len(shardings), sharey=True)
    sparse = table[table["method"].str.startswith("sparse")]
    for ax, sharding in zip(axes[0], shardings):
        rows = sparse[sparse["sharding_label"] == sharding]
        for index, (key, group) in enumerate(rows.groupby(lines)):
            group = group.sort_values(x)
            ax.errorbar(group[x], group["mean"] * 100, yerr=group["std"] * 100, marker="o", markersize=3,
                        capsize=2, label=line_label(key), color=sns.color_palette("colorblind")[index % 10])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(pretty(sharding), fontsize="small")
    return fig, axes, shardings, sparse


def sparsity_figure(table: pd.DataFrame, profile: str, seeds: int):
    """Final test accuracy against sparsity, one line per calibration-round count, one panel per sharding."""
    fig, axes, shardings, sparse = _sparse_accuracy_panels(table, "sparsity", "calibration_rounds",
                                                           lambda rounds: f"R = {int(rounds)}")
    for ax, sharding in zip(axes[0], shardings):
        _baseline_lines(ax, table, sharding)
        ax.set_xscale("logit")
        sparsity_ticks(ax, sparse["sparsity"])
        ax.set_xlabel("sparsity (fraction frozen)")
    fig.suptitle(f"Sparse FedAvg (least-sensitive masks), {provenance(profile, seeds)}", fontsize="medium")
    legend_right(fig, axes[0][-1])
    return fig


def rounds_figure(table: pd.DataFrame, profile: str, seeds: int):
    """Final test accuracy against calibration rounds R, one line per sparsity, one panel per sharding."""
    fig, axes, _, sparse = _sparse_accuracy_panels(table, "calibration_rounds", "sparsity",
                                                   lambda sparsity: f"{sparsity:g}")
    rounds_values = sorted(set(int(r) for r in sparse["calibration_rounds"].dropna()))
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(rounds_values, [str(r) for r in rounds_values])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("calibration rounds R")
    fig.suptitle(f"Calibration rounds, {provenance(profile, seeds)}", fontsize="medium")
    legend_right(fig, axes[0][-1], title="sparsity")
    return fig


RULE_SHORT = {"least_sensitive": "least sens.", "most_sensitive": "most sens.", "lowest_magnitude": "low. mag.",
              "highest_magnitude": "high. mag.", "random": "random"}


def overlap_heatmap(overlap: pd.DataFrame, title: str):
    """Jaccard overlap between the rules' trainable sets (rows and columns in the order given)."""
    labels = [RULE_SHORT.get(r, r.replace("_", " ")) for r in overlap.index]
    table = overlap.set_axis(labels, axis=0).set_axis(labels, axis=1)
    fig = heatmap(table, title, "Jaccard overlap", fmt=".2f", cmap="rocket_r")
    fig.axes[0].tick_params(axis="x", rotation=45)
    fig.axes[0].tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def layer_density_figure(density: pd.DataFrame, title: str):
    """Trainable fraction per transformer block (-1 = embeddings and final norm), one line per rule."""
    fig, axes = figure(COLUMN_WIDTH, aspect=0.75)
    ax = axes[0][0]
    for index, (rule, group) in enumerate(density.groupby("rule", sort=False)):
        group = group.sort_values("block")
        ax.plot(group["block"], group["density"], marker="o", markersize=3, label=rule.replace("_", " "),
                color=sns.color_palette("colorblind")[index % 10])
    ax.set_xlabel("transformer block (-1: embeddings, final norm)")
    ax.set_ylabel("trainable fraction")
    ax.set_ylim(bottom=0)  # linear: a block a rule leaves fully frozen (0) stays on the plot
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    legend_below(fig, ax)
    return fig


def mask_rules_figure(table: pd.DataFrame, profile: str, seeds: int):
    """Final test accuracy (%) per mask rule, mean +- std over seeds: one panel per sparsity, a bar per sharding.

    `table`: columns rule, sparsity, sharding_label, mean, std (accuracies as fractions).
    """
    sparsities = sorted(table["sparsity"].unique())
    fig, axes = figure(FULL_WIDTH, aspect=0.3, ncols=len(sparsities), sharey=True)
    percent = table.assign(mean=table["mean"] * 100, std=table["std"] * 100)
    for ax, sparsity in zip(axes[0], sparsities):
        grouped_bars(ax, percent[percent["sparsity"] == sparsity], "rule", "sharding_label", wrap_labels=True)
        ax.set_title(f"sparsity {sparsity:g}", fontsize="small")
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", labelsize="x-small")
    fig.suptitle(f"Mask calibration rules, {provenance(profile, seeds)}", fontsize="medium")
    legend_right(fig, axes[0][-1], title="sharding")
    return fig
