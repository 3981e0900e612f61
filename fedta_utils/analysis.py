"""Summaries of results: seed statistics, equal-budget comparisons, findings.

Everything here takes the DataFrames that experiments.results_frame /
curves_frame / load_experiment produce and returns a DataFrame or text, so
notebooks and the report state what the numbers say without hand copying.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def mean_std(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for a single seed) and n of `value` grouped by `by`."""
    grouped = frame.groupby(by, dropna=False, sort=False)[value]
    table = grouped.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    table["std"] = table["std"].fillna(0.0)
    return table


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """'83.9 ± 0.4' (accuracies in percent by default)."""
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def epochs_to_fraction(curves: pd.DataFrame, x: str, y: str, fraction: float) -> float:
    """First `x` at which the seed-mean of `y` reaches `fraction` of its final value."""
    mean = curves.dropna(subset=[y]).groupby(x)[y].mean().sort_index()
    if mean.empty:
        return math.nan
    reached = mean[mean >= fraction * mean.iloc[-1]]
    return float(reached.index[0])


def scheduler_findings(table: pd.DataFrame) -> str:
    """Which scheduler ends best and how many epochs each needs, from notebook 01's table."""
    ranked = table.sort_values("mean", ascending=False)
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    lines = [f"Best scheduler: {best['scheduler']} with {format_mean_std(best['mean'], best['std'])} % test accuracy "
             f"(n={int(best['n'])}); worst: {worst['scheduler']} with {format_mean_std(worst['mean'], worst['std'])} %."]
    gap = (best["mean"] - worst["mean"]) * 100
    spread = max(best["std"], worst["std"]) * 100
    lines.append(f"The gap is {gap:.1f} points, {'larger' if gap > 2 * spread else 'not clearly larger'} than "
                 f"twice the larger seed std ({2 * spread:.1f}).")
    for _, row in table.iterrows():
        lines.append(f"{row['scheduler']}: 99 % of the final accuracy after {row['epochs_to_99pct']:g} epochs.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- FedAvg vs centralized

def processed_samples(fed_curves: pd.DataFrame, central_curves: pd.DataFrame, train_size: int) -> pd.DataFrame:
    """Both kinds of curves on one axis: training images processed so far.

    FedAvg processes C*K*J*B images per round (clients x local steps x batch);
    a centralized epoch processes the whole train split once.
    """
    fed = fed_curves.copy()
    clients = np.maximum(1, np.round(fed["participation"] * fed["num_clients"]))
    fed["samples"] = fed["round"] * clients * fed["local_steps"] * fed["batch_size"]
    fed["method"] = "FedAvg"
    frames = [fed]
    if len(central_curves):
        central = central_curves.copy()
        central["samples"] = central["epoch"] * train_size
        central["method"] = "centralized"
        frames.append(central)
    columns = ["method", "seed", "samples", "test_loss", "test_acc"]
    return pd.concat([f[[c for c in columns if c in f.columns]] for f in frames], ignore_index=True)


def accuracy_at_equal_samples(comparison: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy of each method at the largest budget both reached (interpolated)."""
    evaluated = comparison.dropna(subset=["test_acc"])
    budgets = evaluated.groupby("method")["samples"].max()
    budget = budgets.min()
    rows = []
    for method, group in evaluated.groupby("method"):
        mean = group.groupby("samples")["test_acc"].mean().sort_index()
        rows.append({"method": method, "samples": budget,
                     "test_acc": float(np.interp(budget, mean.index.to_numpy(), mean.to_numpy()))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- heterogeneity

def sharding_label(row) -> str:
    if row["sharding"] == "non_iid":
        return f"Nc={int(row['classes_per_client'])}"
    if row["sharding"] == "dirichlet":
        return f"Dir({row['dirichlet_alpha']:g})"
    return "iid"


def with_sharding_label(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds 'sharding_label' ('iid', 'Nc=5', ...) and orders rows iid first, then by Nc."""
    frame = frame.copy()
    if "classes_per_client" not in frame:
        frame["classes_per_client"] = np.nan
    frame["sharding_label"] = frame.apply(sharding_label, axis=1)
    order = frame["classes_per_client"].fillna(np.inf)
    frame["_order"] = np.where(frame["sharding"] == "iid", -1, order)
    return frame.sort_values("_order", kind="stable").drop(columns="_order")


DRIFT_COLUMNS = ["mean_client_delta_norm", "avg_delta_norm", "mean_pairwise_cosine", "sign_conflict_fraction",
                 "sign_agreement"]


def drift_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (sharding, J, seed): each drift diagnostic averaged over rounds; plus the update efficiency.

    update_efficiency = ||average delta|| / mean ||client delta||: 1 when all
    clients agree, ~1/sqrt(m) when their deltas are orthogonal.
    """
    keys = ["sharding_label", "local_steps", "seed"]
    summary = curves.groupby(keys, sort=False)[DRIFT_COLUMNS].mean().reset_index()
    summary["update_efficiency"] = summary["avg_delta_norm"] / summary["mean_client_delta_norm"]
    return summary


def heterogeneity_findings(table: pd.DataFrame, drift: pd.DataFrame) -> str:
    """Plain statements of what the heterogeneity grid shows, computed from its numbers."""
    lines = []
    for j, group in table.groupby("local_steps"):
        by_label = group.set_index("sharding_label")
        if "iid" not in by_label.index:
            continue
        iid = by_label.loc["iid"]
        worst = group.sort_values("mean").iloc[0]
        lines.append(f"J={j}: iid {format_mean_std(iid['mean'], iid['std'])} %, lowest {worst['sharding_label']} "
                     f"{format_mean_std(worst['mean'], worst['std'])} % "
                     f"({(iid['mean'] - worst['mean']) * 100:+.1f} points below iid).")
    per_setting = drift.groupby(["sharding_label", "local_steps"], sort=False)[
        ["mean_pairwise_cosine", "sign_agreement", "sign_conflict_fraction", "update_efficiency"]].mean()
    accuracy = table.set_index(["sharding_label", "local_steps"])["mean"]
    joined = per_setting.join(accuracy)
    if len(joined) >= 3:
        correlation = joined["mean"].rank().corr(joined["mean_pairwise_cosine"].rank())  # Spearman = Pearson on ranks
        lines.append(f"Across the {len(joined)} settings, the Spearman correlation between final accuracy and the "
                     f"mean pairwise cosine of client deltas is {correlation:+.2f}.")
    lowest_cos = joined["mean_pairwise_cosine"].idxmin()
    lines.append(f"Client deltas agree least at {lowest_cos[0]}, J={lowest_cos[1]} "
                 f"(cosine {joined.loc[lowest_cos, 'mean_pairwise_cosine']:.3f}, "
                 f"sign agreement {joined.loc[lowest_cos, 'sign_agreement']:.3f}, "
                 f"entries with some sign conflict {joined.loc[lowest_cos, 'sign_conflict_fraction']:.1%}).")
    return "\n".join(lines)


def drift_by(curves: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Drift diagnostics averaged over rounds, per `keys` (seed kept as a key for error bars)."""
    summary = curves.groupby(keys, sort=False, dropna=False)[DRIFT_COLUMNS].mean().reset_index()
    summary["update_efficiency"] = summary["avg_delta_norm"] / summary["mean_client_delta_norm"]
    return summary


# --------------------------------------------------------------------------- sparse fine-tuning (04, 05)

def method_label(row) -> str:
    """'FedAvg' (trained head, dense), 'dense + frozen head', or 'sparse (<rule>)'."""
    rule = row.get("finetune.mask_rule")
    if isinstance(rule, str):
        return f"sparse ({rule.replace('_', ' ')})"
    return "FedAvg" if row.get("finetune.head") == "train" else f"dense + {row.get('finetune.head')} head"


def with_method_label(frame: pd.DataFrame) -> pd.DataFrame:
    frame = with_sharding_label(frame)
    if "finetune.mask_rule" not in frame:
        frame["finetune.mask_rule"] = None
    frame["method"] = frame.apply(method_label, axis=1)
    return frame


def final_threshold(value) -> float:
    """The last calibration round's threshold from a summary's `thresholds` list."""
    if isinstance(value, (list, tuple)) and value:
        return float(value[-1])
    return math.nan


def sparse_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy (mean, std, n) per sharding, method, sparsity and calibration rounds."""
    frame = with_method_label(results)
    for column in ("finetune.sparsity", "finetune.calibration_rounds"):
        if column not in frame:
            frame[column] = np.nan
    frame["threshold"] = frame.get("thresholds", pd.Series([None] * len(frame))).map(final_threshold)
    keys = ["sharding_label", "method", "finetune.sparsity", "finetune.calibration_rounds"]
    table = mean_std(frame, keys, "final_test_acc")
    thresholds = frame.groupby(keys, dropna=False, sort=False)["threshold"].mean().reset_index()
    achieved = frame.groupby(keys, dropna=False, sort=False)["achieved_sparsity"].mean().reset_index() \
        if "achieved_sparsity" in frame else None
    table = table.merge(thresholds, on=keys, how="left")
    if achieved is not None:
        table = table.merge(achieved, on=keys, how="left")
    return table.rename(columns={"finetune.sparsity": "sparsity", "finetune.calibration_rounds": "calibration_rounds"})


def sparse_findings(table: pd.DataFrame, head_only: pd.DataFrame) -> str:
    """What the sparsity x rounds grid shows, per sharding, computed from its numbers."""
    lines = []
    for sharding, group in table.groupby("sharding_label", sort=False):
        sparse = group[group["method"].str.startswith("sparse")]
        if sparse.empty:
            continue
        best = sparse.sort_values("mean", ascending=False).iloc[0]
        text = (f"{sharding}: best sparse setting sparsity {best['sparsity']:g}, R={int(best['calibration_rounds'])}: "
                f"{format_mean_std(best['mean'], best['std'])} %")
        for method in ("FedAvg", "dense + ridge head", "dense + probe head"):
            row = group[group["method"] == method]
            if len(row):
                text += f"; {method} {format_mean_std(row['mean'].iloc[0], row['std'].iloc[0])} %"
        head = head_only[head_only["sharding_label"] == sharding] if len(head_only) else head_only
        if len(head):
            text += f"; head only {format_mean_std(head['mean'].iloc[0], head['std'].iloc[0])} %"
        lines.append(text + ".")
        by_rounds = sparse.groupby("calibration_rounds")["mean"].mean()
        if len(by_rounds) > 1:
            lines.append(f"  averaged over sparsities, R={int(by_rounds.idxmax())} calibration rounds is best "
                         f"({by_rounds.max() * 100:.1f} %) and R={int(by_rounds.idxmin())} worst "
                         f"({by_rounds.min() * 100:.1f} %).")
    return "\n".join(lines)


def rule_findings(table: pd.DataFrame) -> str:
    """Ranking of the mask rules per sharding and sparsity, with seed spreads."""
    lines = []
    for (sharding, sparsity), group in table.groupby(["sharding_label", "sparsity"], sort=False):
        ranked = group.sort_values("mean", ascending=False)
        ranking = ", ".join(f"{row['rule'].replace('_', ' ')} {format_mean_std(row['mean'], row['std'])}"
                            for _, row in ranked.iterrows())
        best, second = ranked.iloc[0], ranked.iloc[1] if len(ranked) > 1 else ranked.iloc[0]
        separated = (best["mean"] - second["mean"]) > (best["std"] + second["std"])
        lines.append(f"{sharding}, sparsity {sparsity:g}: {ranking} (%). The best rule is "
                     f"{'clearly' if separated else 'not clearly'} ahead of the second (gap vs. summed std).")
    return "\n".join(lines)


def mask_overlap(results: pd.DataFrame, sharding: str, sparsity: float, seed: int) -> pd.DataFrame:
    """Jaccard overlap of the trainable sets of every pair of rules (one sharding, sparsity, seed)."""
    from .masks import jaccard
    from .sparse import load_run_masks

    frame = with_method_label(results)
    chosen = frame[(frame["sharding_label"] == sharding) & (frame["finetune.sparsity"] == sparsity)
                   & (frame["seed"] == seed)]
    masks = {row["finetune.mask_rule"]: load_run_masks(row["run_dir"]) for _, row in chosen.iterrows()}
    rules = [r for r in masks if masks[r] is not None]
    return pd.DataFrame([[jaccard(masks[a], masks[b]) for b in rules] for a in rules], index=rules, columns=rules)


def layer_density(results: pd.DataFrame, sharding: str, sparsity: float, seed: int) -> pd.DataFrame:
    """Per rule and transformer block: the fraction of entries the mask leaves trainable."""
    from .masks import mask_density_by_parameter
    from .sparse import load_run_masks

    frame = with_method_label(results)
    chosen = frame[(frame["sharding_label"] == sharding) & (frame["finetune.sparsity"] == sparsity)
                   & (frame["seed"] == seed)]
    parts = []
    for _, row in chosen.iterrows():
        masks = load_run_masks(row["run_dir"])
        if masks is None:
            continue
        table = mask_density_by_parameter(masks)
        per_block = table.groupby("block")[["entries", "trainable"]].sum().reset_index()
        per_block["density"] = per_block["trainable"] / per_block["entries"]
        parts.append(per_block.assign(rule=row["finetune.mask_rule"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
