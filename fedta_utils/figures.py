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

import functools
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.ticker import EngFormatter

from .experiments import (CENTRALIZED, FEDAVG_IID, HEAD_ONLY, HETEROGENEITY, LR_SEARCH, MASK_RULES,
                          SPARSE_CENTRAL, SPARSE_FL)
from .sensitivity import RULES, unpack_masks

DATA = "00_data"  # notebook 00 saves split_sizes.csv and shard_stats.csv here
COLUMN, FULL = 3.3, 6.9  # inches: one column of the report, both columns
DRIFT = ["mean_client_delta_norm", "avg_delta_norm", "mean_pairwise_cosine", "sign_conflict_fraction",
         "sign_agreement"]  # logged per FedAvg round (federated.py)


class NoResults(LookupError):
    """An experiment (or a table of notebook 00) that a table or figure needs has no results yet."""


# --------------------------------------------------------------------------- loaders

def flatten(config: dict, prefix: str = "") -> dict:
    """{'finetune': {'head': 'ridge'}} -> {'finetune.head': 'ridge'}."""
    flat = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def _labelled(run: dict, experiment: str) -> dict:
    """The run with its display labels; sparsity and R only where a mask rule makes them matter."""
    rule = run.get("finetune.mask_rule") if isinstance(run.get("finetune.mask_rule"), str) else None
    head = run.get("finetune.head", "train")
    dense = ("FedAvg" if "sharding" in run else "centralized") if head == "train" else f"dense + {head} head"
    sharding = {"non_iid": f"Nc={run.get('classes_per_client')}",
                "dirichlet": f"Dir({run.get('dirichlet_alpha')})"}.get(run.get("sharding"), run.get("sharding"))
    return {**run, "sharding_label": sharding, "rule": rule,
            "method": "head only" if experiment == HEAD_ONLY else "sparse" if rule else dense,
            "sparsity": run.get("finetune.sparsity") if rule else np.nan,
            "calibration_rounds": run.get("finetune.calibration_rounds") if rule else np.nan}


def load_runs(root, experiment: str) -> pd.DataFrame:
    """One row per complete run (summary.json written): flattened config, summary, run_dir, labels.

    Labels: sharding_label ('iid', 'Nc=5', 'Dir(0.1)'; rows iid first, then by Nc), method
    ('FedAvg', 'dense + ridge head', 'sparse', 'head only'), rule, sparsity and calibration_rounds.
    Empty (no columns) when the experiment has no complete run.
    """
    rows = [_labelled({**flatten(json.loads((path.parent / "config.json").read_text())),
                       **json.loads(path.read_text()), "run_dir": str(path.parent)}, experiment)
            for path in sorted(Path(root, experiment).glob("*/summary.json"))]
    order = {"iid": -1, "non_iid": 0}
    rows.sort(key=lambda r: (order.get(r.get("sharding"), 1), r.get("classes_per_client") or 0))
    return pd.DataFrame(rows)


def _runs(root, experiment: str) -> pd.DataFrame:
    runs = load_runs(root, experiment)
    if runs.empty:
        raise NoResults(f"no complete run of {experiment} under {root}")
    return runs


def _curves(runs: pd.DataFrame, columns) -> pd.DataFrame:
    if runs.empty:
        raise NoResults("no runs to read curves from")
    return pd.concat([pd.read_csv(Path(run["run_dir"], "metrics.csv")).assign(
        **{c: run.get(c) for c in ("run_dir", *columns)}) for _, run in runs.iterrows()], ignore_index=True)


def load_curves(root, experiment: str, columns=("seed",)) -> pd.DataFrame:
    """metrics.csv of every complete run (a row per epoch or round), with the chosen columns of load_runs."""
    return _curves(_runs(root, experiment), columns)


def read_csv(root, name: str) -> pd.DataFrame:
    """A table notebook 00 saved under <root>/00_data/ (split_sizes.csv, shard_stats.csv)."""
    path = Path(root, DATA, name)
    if not path.is_file():
        raise NoResults(f"{path} does not exist (run notebook 00)")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- statistics and selection

def mean_std(runs: pd.DataFrame, keys: list[str], extra=()) -> pd.DataFrame:
    """Per configuration (`keys`): test accuracy mean, std, n; `val`, the mean final validation
    accuracy that selection uses; and the mean of each `extra` column."""
    runs = runs.assign(final_test_acc=pd.to_numeric(runs.get("final_test_acc", np.nan)))
    table = runs.groupby(keys, sort=False, dropna=False).agg(
        mean=("final_test_acc", "mean"), std=("final_test_acc", "std"), n=("run_dir", "count"),
        val=("final_val_acc", "mean"), **{c: (c, "mean") for c in extra}).reset_index()
    return table.assign(std=table["std"].fillna(0.0))


def choose(table: pd.DataFrame, within=(), among=None) -> pd.DataFrame:
    """`table` with a column `chosen`: per group of `within`, the row of highest `val` among the rows
    where `among` is true (all by default), the first on a tie. The rule of the module docstring."""
    candidates = table if among is None else table[among]
    groups = candidates.groupby(list(within), sort=False) if within else [((), candidates)]
    best = [group["val"].idxmax() for _, group in groups if group["val"].notna().any()]
    return table.assign(chosen=table.index.isin(best))


# --------------------------------------------------------------------------- tables

def shard_table(root) -> pd.DataFrame:
    """Notebook 00, per sharding scheme: clients, samples and classes per client, mean largest-class share."""
    stats = read_csv(root, "shard_stats.csv")
    return stats.groupby("scheme", sort=False).agg(
        clients=("client", "count"), samples_min=("samples", "min"), samples_max=("samples", "max"),
        classes_min=("classes", "min"), classes_max=("classes", "max"),
        largest_class_share=("largest_class_share", "mean")).reset_index()


def lr_search_table(root) -> pd.DataFrame:
    """Notebook 01: `val` of every (lr, weight_decay) of the search; `chosen`: the pair kept."""
    runs = _runs(root, LR_SEARCH).sort_values(["lr", "weight_decay"], kind="stable")
    return choose(mean_std(runs, ["lr", "weight_decay"]))


def _central_runs(root) -> pd.DataFrame:
    """Notebook 01's scheduler runs at the lr and weight decay it chose (hparams.json; all runs without it)."""
    runs, path = _runs(root, CENTRALIZED), Path(root, "hparams.json")
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    keep = np.isclose(runs["lr"], chosen.get("lr", np.nan)) & np.isclose(runs["weight_decay"],
                                                                         chosen.get("weight_decay", np.nan))
    return runs[keep] if keep.any() else runs


def centralized_table(root) -> pd.DataFrame:
    """Notebook 01, per scheduler at the chosen lr: test accuracy, `val`, `chosen` (the best scheduler)
    and epochs_to_99, the first epoch whose seed-mean test accuracy reaches 99 % of its final value."""
    runs = _central_runs(root)
    mean = _curves(runs, ["scheduler"]).dropna(subset=["test_acc"]).groupby(["scheduler", "epoch"])["test_acc"].mean()
    table = choose(mean_std(runs, ["scheduler"]))
    table["epochs_to_99"] = [mean[s].index[mean[s] >= 0.99 * mean[s].iloc[-1]][0] for s in table["scheduler"]]
    return table


def _reference(root) -> pd.DataFrame:
    """Notebook 02's reference: the centralized cosine runs at the chosen lr and weight decay."""
    runs = _central_runs(root)
    return runs[runs["scheduler"] == "cosine"].assign(method="centralized (cosine)")


def sample_curves(root) -> pd.DataFrame:
    """Test loss and accuracy of FedAvg (iid) and of the centralized reference against images processed.

    A FedAvg round processes m*J*B images (m = max(1, round(C*K)) clients, J steps of B images); a
    centralized epoch the train split once. Without notebook 00 or 01 results, FedAvg alone.
    """
    fed = load_curves(root, FEDAVG_IID, ["seed", "participation", "num_clients", "local_steps", "batch_size"])
    clients = np.maximum(1, np.round(fed["participation"] * fed["num_clients"]))
    parts = [fed.assign(samples=fed["round"] * clients * fed["local_steps"] * fed["batch_size"], method="FedAvg (iid)")]
    try:
        central = _curves(_reference(root), ["seed", "method"])
        train = read_csv(root, "split_sizes.csv").set_index("split").loc["train", "images"]
        parts.insert(0, central.assign(samples=central["epoch"] * train))
    except NoResults:  # FedAvg alone
        pass
    return pd.concat(parts, ignore_index=True).dropna(subset=["test_acc"])


def fedavg_table(root) -> pd.DataFrame:
    """Notebook 02: the centralized reference and FedAvg (iid), test accuracy over seeds, and each one's
    seed-mean test accuracy (acc_at_budget) at `budget`, the most images both processed (interpolated)."""
    curves = sample_curves(root)
    mean = curves.groupby(["method", "samples"])["test_acc"].mean()
    budget = curves.groupby("method")["samples"].max().min()
    runs = [_runs(root, FEDAVG_IID).assign(method="FedAvg (iid)")]
    if curves["method"].nunique() > 1:
        runs.insert(0, _reference(root))
    table = mean_std(pd.concat(runs, ignore_index=True), ["method"]).assign(budget=budget)
    return table.assign(acc_at_budget=[np.interp(budget, mean[m].index, mean[m]) for m in table["method"]])


def heterogeneity_table(root) -> pd.DataFrame:
    """Notebook 03: test accuracy over seeds per sharding and local steps J."""
    return mean_std(_runs(root, HETEROGENEITY), ["sharding_label", "local_steps"])


def drift_table(root, experiment: str = HETEROGENEITY) -> pd.DataFrame:
    """Per run: the drift and interference diagnostics averaged over rounds, with the run's labels.

    update_efficiency = ||average delta|| / mean ||client delta||: 1 when the clients agree, about
    1/sqrt(m) when their m deltas are orthogonal.
    """
    runs = _runs(root, experiment)
    drift = _curves(runs, []).groupby("run_dir")[DRIFT].mean()
    drift["update_efficiency"] = drift["avg_delta_norm"] / drift["mean_client_delta_norm"]
    labels = ["run_dir", "seed", "sharding_label", "local_steps", "rule", "sparsity"]
    return runs[labels].merge(drift.reset_index(), on="run_dir")


def sparse_table(root) -> pd.DataFrame:
    """Notebook 04, per sharding, method, sparsity and calibration rounds: test accuracy over seeds,
    `val`, the last calibration round's Fisher threshold and the achieved sparsity (seed means), and
    `chosen`, the best sparse setting per sharding. The dense references run the same rounds: FedAvg,
    the frozen step-0 head with a dense backbone, and the head alone ('head only') where it ran."""
    runs = pd.concat([_runs(root, SPARSE_FL), load_runs(root, HEAD_ONLY)], ignore_index=True)
    thresholds = runs["thresholds"] if "thresholds" in runs else pd.Series([None] * len(runs))
    runs["threshold"] = [t[-1] if isinstance(t, list) and t else np.nan for t in thresholds]
    runs["achieved_sparsity"] = pd.to_numeric(runs.get("achieved_sparsity", np.nan))
    keys = ["sharding_label", "method", "sparsity", "calibration_rounds"]
    table = mean_std(runs, keys, extra=["threshold", "achieved_sparsity"])
    return choose(table, ["sharding_label"], among=table["method"] == "sparse")


def sparse_central_table(root) -> pd.DataFrame:
    """Notebook 04: centralized sparse fine-tuning, test accuracy over seeds per sparsity and R."""
    return mean_std(_runs(root, SPARSE_CENTRAL), ["sparsity", "calibration_rounds"])


def rules_table(root) -> pd.DataFrame:
    """Notebook 05, per sharding, sparsity and mask rule (least-sensitive first): test accuracy over
    seeds and `chosen`, the best rule per sharding and sparsity."""
    runs = _runs(root, MASK_RULES)
    runs = runs.iloc[np.argsort([RULES.index(r) for r in runs["rule"]], kind="stable")]
    return choose(mean_std(runs, ["sharding_label", "sparsity", "rule"]), ["sharding_label", "sparsity"])


def interference_table(root) -> pd.DataFrame:
    """Notebook 05: drift_table's diagnostics per sharding, sparsity and rule, averaged over seeds."""
    drift = drift_table(root, MASK_RULES)
    return drift.groupby(["sharding_label", "sparsity", "rule"], sort=False)[
        [*DRIFT, "update_efficiency"]].mean().reset_index()


def _rule_masks(root, sharding: str, sparsity, seed) -> dict:
    """rule -> {parameter name: bool mask} of notebook 05's runs at one sharding, sparsity (default:
    the smallest) and seed (default: the smallest), from each run's prepared.pt."""
    runs = _runs(root, MASK_RULES)
    runs = runs[runs["sharding_label"] == sharding]
    sparsity = runs["sparsity"].min() if sparsity is None else sparsity
    seed = runs["seed"].min() if seed is None else seed
    chosen = runs[np.isclose(runs["sparsity"], sparsity) & (runs["seed"] == seed)]
    return {run.rule: unpack_masks(torch.load(Path(run.run_dir, "prepared.pt"), weights_only=True)["masks"])
            for run in chosen.itertuples()}


def mask_overlap_table(root, sharding: str = "iid", sparsity=None, seed=None) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of the rules' trainable sets (1 when both are empty)."""
    masks = _rule_masks(root, sharding, sparsity, seed)
    flat = {rule: torch.cat([m[name].flatten() for name in sorted(m)]) for rule, m in masks.items()}

    def jaccard(a, b) -> float:
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union

    return pd.DataFrame([[jaccard(flat[a], flat[b]) for b in flat] for a in flat], index=list(flat),
                        columns=list(flat))


def block_density_table(root, sharding: str = "iid", sparsity=None, seed=None) -> pd.DataFrame:
    """Per rule and transformer block (-1: parameters outside the blocks): entries and trainable fraction."""
    rows = [{"rule": rule, "block": int(match.group(1)) if (match := re.match(r"blocks\.(\d+)\.", name)) else -1,
             "entries": mask.numel(), "trainable": int(mask.sum())}
            for rule, masks in _rule_masks(root, sharding, sparsity, seed).items() for name, mask in masks.items()]
    table = pd.DataFrame(rows).groupby(["rule", "block"], sort=False)[["entries", "trainable"]].sum().reset_index()
    return table.assign(density=table["trainable"] / table["entries"])


# --------------------------------------------------------------------------- figure helpers

def _axes(ncols: int = 1, **kwargs):
    """The one theme, and a row of `ncols` axes (constrained layout: legends outside stay inside the figure)."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=0.9,
                  rc={"pdf.fonttype": 42, "ps.fonttype": 42, "legend.frameon": False, "figure.dpi": 120,
                      "savefig.dpi": 200, "axes.titlesize": "medium", "figure.titlesize": "medium"})
    fig, axes = plt.subplots(1, ncols, squeeze=False, layout="constrained", **kwargs)
    return fig, axes[0]


def _title(text: str, profile: str, seeds) -> str:
    return f"{text} (profile {profile}, {int(seeds)} seed{'s' if int(seeds) != 1 else ''})"


def _pretty(label) -> str:
    """A sharding label for display: 'Nc=5' -> '$N_c$=5'."""
    return str(label).replace("Nc=", "$N_c$=")


def _legend_right(ax, title=None) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), title=title, fontsize="x-small")


def placeholder(title: str, message: str, width: float = COLUMN, aspect: float = 0.5):
    """A hatched stand-in at the size of the figure it replaces, so the layout stays and the gap shows."""
    fig, (ax,) = _axes()
    fig.set_size_inches(width, width * aspect)
    ax.set(xticks=[], yticks=[])
    ax.grid(False)
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="#fff8e1", edgecolor="#d39e00",
                               hatch="//", alpha=0.5))
    ax.text(0.5, 0.5, f"{title}\n{message}", ha="center", va="center", fontsize=7, wrap=True,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#d39e00"})
    return fig


def _figure(width: float, aspect: float):
    """A figure function's size (width inches, height = width * aspect); a placeholder of that size
    when its results are missing. The size is also `function.size`, for the report's placeholders."""
    def wrap(draw):
        @functools.wraps(draw)
        def figure(root, profile: str):
            try:
                fig = draw(root, profile)
            except NoResults as missing:
                return placeholder(f"{draw.__name__}: no results yet (profile {profile})", str(missing),
                                   width, aspect)
            fig.set_size_inches(width, width * aspect)
            return fig
        figure.size = (width, aspect)
        return figure
    return wrap


def save(fig, stem) -> list[Path]:
    """<stem>.pdf (TrueType fonts embedded) and <stem>.png."""
    paths = [Path(stem).with_suffix(".pdf"), Path(stem).with_suffix(".png")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fig.savefig(path)
    return paths


def _loss_and_accuracy(curves: pd.DataFrame, x: str, xlabel: str, hue: str, title: str):
    """Test loss and test accuracy (%) against `x`: the seed mean with a band of +-1 std, a line per `hue`."""
    fig, axes = _axes(2)
    for ax, y, label, scale in zip(axes, ("test_loss", "test_acc"), ("test loss", "test accuracy (%)"), (1, 100)):
        sns.lineplot(data=curves.assign(y=curves[y] * scale), x=x, y="y", hue=hue, errorbar="sd", ax=ax,
                     legend=ax is axes[-1])
        ax.set(xlabel=xlabel, ylabel=label)
    _legend_right(axes[-1])
    fig.suptitle(title)
    return fig, axes


# --------------------------------------------------------------------------- figures

@_figure(COLUMN, 0.8)
def lr_search_heatmap(root, profile: str):
    """Notebook 01: validation accuracy (%) of every (learning rate, weight decay) pair of the search."""
    table = lr_search_table(root)
    fig, (ax,) = _axes()
    sns.heatmap(table.pivot(index="lr", columns="weight_decay", values="val") * 100, annot=True, fmt=".1f",
                cmap="viridis", ax=ax, cbar_kws={"label": "val. accuracy (%)"}, annot_kws={"fontsize": 7})
    ax.set(xlabel="weight decay", ylabel="learning rate", title=_title("LR search", profile, table["n"].max()))
    return fig


@_figure(FULL, 0.36)
def centralized_curves(root, profile: str):
    """Notebook 01: test loss and accuracy per epoch, one line per scheduler, at the chosen lr."""
    curves = _curves(_central_runs(root), ["scheduler", "seed"]).dropna(subset=["test_acc"])
    return _loss_and_accuracy(curves, "epoch", "epoch", "scheduler",
                              _title("Centralized", profile, curves["seed"].nunique()))[0]


@_figure(FULL, 0.36)
def fedavg_vs_centralized(root, profile: str):
    """Notebook 02: FedAvg (iid) and the centralized reference against training images processed."""
    curves = sample_curves(root)
    fig, axes = _loss_and_accuracy(curves, "samples", "training images processed", "method",
                                   _title("FedAvg vs centralized", profile, curves["seed"].nunique()))
    for ax in axes:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M
    return fig


@_figure(COLUMN, 0.8)
def heterogeneity_heatmap(root, profile: str):
    """Notebook 03: final test accuracy (%), mean and std over seeds, per sharding (rows) and J (columns)."""
    table = heterogeneity_table(root)
    mean, std = (table.pivot(index="sharding_label", columns="local_steps", values=v)
                 .reindex(table["sharding_label"].unique()) * 100 for v in ("mean", "std"))
    text = mean.map("{:.1f}".format) + "\n±" + std.map("{:.1f}".format)
    fig, (ax,) = _axes()
    sns.heatmap(mean.rename(index=_pretty), annot=text.to_numpy(), fmt="", cmap="viridis", ax=ax,
                cbar_kws={"label": "test accuracy (%)"}, annot_kws={"fontsize": 7})
    ax.set(xlabel="local steps J", ylabel="sharding", title=_title("FedAvg", profile, table["n"].max()))
    ax.tick_params(axis="y", rotation=0)
    return fig


@_figure(FULL, 0.3)
def heterogeneity_curves(root, profile: str):
    """Notebook 03: test accuracy per round, one panel per J, one line per sharding."""
    curves = load_curves(root, HETEROGENEITY, ["seed", "local_steps", "sharding_label"]).dropna(subset=["test_acc"])
    curves = curves.assign(test_acc=curves["test_acc"] * 100, sharding=curves["sharding_label"].map(_pretty))
    steps = sorted(curves["local_steps"].unique())
    fig, axes = _axes(len(steps), sharey=True)
    for ax, j in zip(axes, steps):
        sns.lineplot(data=curves[curves["local_steps"] == j], x="round", y="test_acc", hue="sharding",
                     errorbar="sd", ax=ax, legend=ax is axes[-1])
        ax.set(title=f"J = {j}", xlabel="round", ylabel="test accuracy (%)")
    _legend_right(axes[-1])
    fig.suptitle(_title("FedAvg under heterogeneity", profile, curves["seed"].nunique()))
    return fig


@_figure(FULL, 0.28)
def drift_figure(root, profile: str):
    """Notebook 03: drift and interference averaged over rounds, per sharding, one line per J; bars: std."""
    drift = drift_table(root)
    drift["sharding"] = drift["sharding_label"].map(_pretty)
    panels = {"mean_pairwise_cosine": "mean pairwise cosine", "sign_agreement": "sign agreement",
              "mean_client_delta_norm": "client delta norm (L2)", "update_efficiency": "update efficiency"}
    fig, axes = _axes(len(panels))
    for ax, (column, label) in zip(axes, panels.items()):
        sns.pointplot(data=drift, x="sharding", y=column, hue="local_steps", errorbar="sd", ax=ax, markersize=3,
                      dodge=0.3 if drift["local_steps"].nunique() > 1 else False,  # seaborn divides by levels - 1
                      linewidth=1, palette="colorblind", legend=ax is axes[-1])
        ax.set(xlabel="", ylabel=label)
        ax.tick_params(axis="x", rotation=45)
    _legend_right(axes[-1], title="J")
    fig.suptitle(_title("Client drift and interference", profile, drift["seed"].nunique()))
    return fig


@_figure(FULL, 0.32)
def sparsity_figure(root, profile: str):
    """Notebook 04: final test accuracy against sparsity (least-sensitive masks), a line per calibration
    rounds R, the dense references as horizontal lines; a panel per sharding; bars: std over seeds."""
    table = sparse_table(root)
    shardings = table["sharding_label"].unique()
    fig, axes = _axes(len(shardings), sharey=True)
    for ax, label in zip(axes, shardings):
        rows = table[table["sharding_label"] == label]
        sparse = rows[rows["method"] == "sparse"]
        for rounds, group in sparse.groupby("calibration_rounds"):
            ax.errorbar(group["sparsity"], group["mean"] * 100, yerr=group["std"] * 100, marker="o",
                        markersize=3, capsize=2, label=f"R = {int(rounds)}")
        for (_, ref), style in zip(rows[rows["method"] != "sparse"].iterrows(), (":", "-.", "--", "-")):
            ax.axhline(ref["mean"] * 100, color="0.4", linewidth=0.8, linestyle=style, label=ref["method"])
        ax.set(xscale="logit", xlabel="sparsity (fraction frozen)", ylabel="test accuracy (%)", title=_pretty(label))
    _legend_right(axes[-1])
    fig.suptitle(_title("Sparse FedAvg", profile, table["n"].max()))
    return fig


@_figure(FULL, 0.3)
def mask_rules_figure(root, profile: str):
    """Notebook 05: final test accuracy (%) per mask rule, a panel per sparsity, a bar per sharding;
    bars: std over seeds."""
    runs = _runs(root, MASK_RULES)
    runs = runs.assign(test_acc=runs["final_test_acc"] * 100, sharding=runs["sharding_label"].map(_pretty),
                       rule=runs["rule"].str.replace("_", "\n"))
    order, sparsities = [r.replace("_", "\n") for r in RULES], sorted(runs["sparsity"].unique())
    fig, axes = _axes(len(sparsities), sharey=True)
    for ax, sparsity in zip(axes, sparsities):
        sns.barplot(data=runs[runs["sparsity"] == sparsity], x="rule", y="test_acc", hue="sharding", order=order,
                    errorbar="sd", capsize=0.1, err_kws={"linewidth": 0.8}, ax=ax, legend=ax is axes[-1])
        ax.set(title=f"sparsity {sparsity:g}", xlabel="", ylabel="test accuracy (%)")
        ax.tick_params(axis="x", labelsize="x-small")
    _legend_right(axes[-1])
    fig.suptitle(_title("Mask calibration rules", profile, runs["seed"].nunique()))
    return fig


@_figure(COLUMN, 0.8)
def mask_overlap_heatmap(root, profile: str):
    """Notebook 05: Jaccard overlap of the rules' trainable sets (iid, smallest sparsity and seed)."""
    overlap = mask_overlap_table(root)
    names = [r.replace("_sensitive", " sens.").replace("_magnitude", " mag.") for r in overlap.index]
    fig, (ax,) = _axes()
    sns.heatmap(overlap.set_axis(names, axis=0).set_axis(names, axis=1), annot=True, fmt=".2f", vmin=0, vmax=1,
                cmap="rocket_r", ax=ax, cbar_kws={"label": "Jaccard overlap"}, annot_kws={"fontsize": 7})
    ax.set_title(f"Mask overlap, iid, one seed (profile {profile})")
    return fig


@_figure(COLUMN, 0.75)
def block_density_figure(root, profile: str):
    """Notebook 05: trainable fraction per transformer block, a line per rule (iid, smallest sparsity and seed)."""
    density = block_density_table(root)
    fig, (ax,) = _axes()
    sns.lineplot(data=density.assign(rule=density["rule"].str.replace("_", " ")), x="block", y="density",
                 hue="rule", marker="o", markersize=3, ax=ax)
    ax.set(xlabel="transformer block (-1: outside the blocks)", ylabel="trainable fraction", ylim=(0, None),
           title=f"Trainable fraction per block, iid (profile {profile})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize="x-small")
    return fig
