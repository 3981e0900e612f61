r"""The report's generated inputs, from one results root, and the PDF build.

    warnings = write_report("results/full", "report", "full")   # figures, tables, numbers.tex
    built = build_pdf("report")                                  # latexmk: ok, pages, body_pages, ...

write_report calls the same figures.py functions the notebooks call, and writes
    <report_dir>/figures/<name>.pdf (+ .png)   every figure of FIGURES
    <report_dir>/tables/<name>.tex             booktabs tabulars of TABLES (main.tex adds float and caption)
    <report_dir>/generated/numbers.tex         a \newcommand for every entry of MACROS, with its comment
An experiment without results, or a figure, table or section of macros that fails, becomes a hatched
placeholder figure, a placeholder table or "n/a" macros and a warning in the returned list, never an
exception: the report still builds and the gap shows in the PDF. Every "best" the macros quote is
chosen on validation and reported on test, by results.choose.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import figures, results
from .experiments import (
    CENTRALIZED,
    FEDAVG_IID,
    FEDAVG_LR_SEARCH,
    FEDAVGM_SEARCH,
    FEDPROX_SEARCH,
    HEAD_ONLY,
    HETEROGENEITY,
    LR_SEARCH,
    MASK_RULES,
    REMEDIES,
    SPARSE_CENTRAL,
    SPARSE_FL,
    SPARSE_LR_SEARCH,
    TIES_SEARCH,
    sweeps,
)
from .results import NoResults
from .runs import GRIDS_DIR, grid_runs

REPO_ROOT = Path(__file__).resolve().parent.parent
BODY_PAGE_LIMIT = 8  # the course's limit: pages up to \label{LastBodyPage}, references excluded
NA = r"\textit{n/a}"  # the value of a macro whose experiment has no results
INSTALL_TEX = (
    "sudo apt-get install -y latexmk texlive-latex-extra texlive-fonts-recommended "
    "texlive-bibtex-extra lmodern"
)  # Debian / Ubuntu
EXPERIMENTS = (
    LR_SEARCH,
    CENTRALIZED,
    FEDAVG_LR_SEARCH,
    FEDAVG_IID,
    HETEROGENEITY,
    HEAD_ONLY,
    SPARSE_LR_SEARCH,
    SPARSE_FL,
    SPARSE_CENTRAL,
    MASK_RULES,
    REMEDIES,
)
NOTICE = (
    r"\fbox{\parbox{0.96\linewidth}{\small\textbf{Not results: a %(profile)s build.} Every number, table and "
    r"figure below comes from the \texttt{%(profile)s} profile, which checks that the pipeline runs end to "
    r"end. Only a build from the \texttt{full} profile reports the study.}}"
)

MACROS = {  # every macro of numbers.tex -> the comment written beside it; accuracies are test accuracies
    "ResultsProfile": "profile of the results",
    "ResultsNotice": "a warning box unless the profile is full",
    "TrainSize": "images in the train split",
    "ValSize": "images in the validation split",
    "TestSize": "images in the test set",
    "ValFraction": "share of the official train set held out",
    "NumClients": "K of notebook 00's shards",
    "DataProvenance": "caption provenance of notebook 00",
    "SearchGrid": "the learning-rate search, run under every scheduler",
    "SearchProvenance": "caption provenance of the search",
    "CentralizedSetting": "the scheduler runs",
    "BestScheduler": "scheduler chosen on validation",
    "ChosenLr": "its learning rate, chosen on validation for it",
    "ChosenWeightDecay": "its weight decay, chosen on validation for it",
    "CentralizedBestAcc": "its accuracy, mean +- std",
    "CentralizedProvenance": "caption provenance",
    "FedAvgSearchGrid": "notebook 02's client lr search",
    "FedAvgChosenLr": "client lr chosen on validation",
    "FedAvgChosenWeightDecay": "client weight decay chosen on validation",
    "SparseSearchGrid": "notebook 04's lr search under the frozen head",
    "SparseChosenLr": "its chosen lr",
    "FedAvgSetting": "the FedAvg iid runs",
    "FedAvgIidAcc": "their accuracy, mean +- std",
    "EqualSamplesBudget": "training images both FedAvg and centralized processed",
    "FedAvgProvenance": "caption provenance of notebook 02",
    "HeteroGrid": "the heterogeneity grid",
    "HeteroProvenance": "caption provenance of notebook 03",
    "SparseSetting": "the sparse FedAvg runs",
    "SparseProvenance": "caption provenance of notebook 04",
    "SparseIidBestAcc": "iid: sparse setting chosen on validation, mean +- std",
    "SparseIidBestGap": "iid: its accuracy minus dense FedAvg's, points",
    "SparseNonIidBestAcc": "non-iid: sparse setting chosen on validation, mean +- std",
    "SparseNonIidBestGap": "non-iid: its accuracy minus dense FedAvg's, points",
    "SparseCentralAcc": "centralized sparse fine-tuning, mean +- std",
    "SparseCentralSetting": "its sparsity and R",
    "SparseCentralScheduler": "its scheduler: notebook 01's choice",
    "SparseCentralLr": "its lr, searched on validation under the frozen head",
    "RulesSetting": "the rule comparison",
    "RulesProvenance": "caption provenance of notebook 05",
    "RulesSparsity": "the smallest sparsity: overlap, density, interference and the macros below",
    "RulesIidBestRule": "iid: rule chosen on validation",
    "RulesIidBestAcc": "its accuracy, mean +- std",
    "RulesNonIidBestRule": "non-iid: rule chosen on validation",
    "RulesNonIidBestAcc": "its accuracy",
    "RemedySetting": "notebook 06's runs",
    "RemedySearches": "its searches",
    "RemedyChosen": "the values its runs used",
    "RemedyBest": "per non-iid sharding: the method chosen on validation, its accuracy and gain",
    "RemedyScaffoldState": "SCAFFOLD's control variates, float32, on the host",
    "RemedyProvenance": "caption provenance of notebook 06",
}


# --------------------------------------------------------------------------- LaTeX text


def escape(text) -> str:
    """Text with LaTeX's special characters escaped."""
    words = {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return re.sub(r"[\\&%$#_{}~^]", lambda m: words.get(m.group(), "\\" + m.group()), str(text))


def number(value) -> str:
    """Shortest form; a x 10^b when tiny or huge (Fisher thresholds span many decades); '--' for NaN."""
    value = float(value)
    if pd.isna(value):
        return "--"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"${float(mantissa):g}\\times10^{{{int(exponent)}}}$"


def listing(values) -> str:
    return ", ".join(number(v) for v in sorted(set(pd.Series(values).dropna())))


def braces(values) -> str:
    """'\\{0.5, 1\\}': the listing of `values` as a set."""
    return f"\\{{{listing(values)}\\}}"


def integer(value) -> str:
    return "--" if pd.isna(value) else f"{int(value):,}".replace(",", "{,}")


def thousands(values: pd.Series) -> pd.Series:
    """Image counts in thousands, the unit of the tables' "images (k)" columns."""
    return (values / 1000).map(number)


def share(value) -> str:
    """A fraction in percent with one decimal; '--' for NaN."""
    return "--" if pd.isna(value) else f"{value * 100:.1f}"


def percent(row) -> str:
    """'82.0 +- 2.0 %' in text mode, from a table row's test accuracy mean and std (fractions)."""
    return f"{row['mean'] * 100:.1f}\\,$\\pm$\\,{row['std'] * 100:.1f}\\,\\%"


def cell(row) -> str:
    """A table cell '$82.0 \\pm 2.0$' (percent), starred when the row is the one chosen; '--' for None."""
    if row is None or pd.isna(row["mean"]):
        return "--"
    star = "^\\star" if row.get("chosen") else ""
    return f"${row['mean'] * 100:.1f} \\pm {row['std'] * 100:.1f}{star}$"


def sharding_tex(label) -> str:
    """'Nc=5' -> '$N_c{=}5$', 'Dir(0.1)' or 'Dir(alpha=0.1)' -> 'Dir($\\alpha{=}0.1$)', 'iid' -> 'iid'."""
    label = re.sub(r"^Nc=(\d+)$", r"$N_c{=}\1$", str(label))
    return re.sub(r"^Dir\((?:alpha=)?([0-9.e-]+)\)$", r"Dir($\\alpha{=}\1$)", label)


def provenance(profile: str, table) -> str:
    """'profile full, 3 seeds': the profile and the most runs any row of `table` averages."""
    return f"profile {escape(profile)}, {(seeds := int(table['n'].max()))} seed{'s' if seeds != 1 else ''}"


def booktabs(data, columns=None) -> str:
    """A booktabs tabular of LaTeX cells (escape text first), pd.DataFrame(data, columns=columns): first
    column left, the rest right."""
    frame = pd.DataFrame(data, columns=columns)
    rows = [" & ".join(map(str, row)) + r" \\" for row in [frame.columns, *frame.itertuples(index=False)]]
    return "\n".join(
        [
            f"\\begin{{tabular}}{{l{'r' * (frame.shape[1] - 1)}}}",
            "\\toprule",
            rows[0],
            "\\midrule",
            *rows[1:],
            "\\bottomrule",
            "\\end{tabular}",
            "",
        ]
    )


def _row(table: pd.DataFrame, **match):
    """The first row whose columns equal `match`, or None."""
    hit = table[(table[list(match)] == pd.Series(match)).all(axis=1)]
    return hit.iloc[0] if len(hit) else None


def _span(low, high) -> str:
    return str(low) if low == high else f"{low}--{high}"


def _regime(row) -> str:
    """'Iid' or 'NonIid': how the macros name the sharding of a table's row."""
    return "Iid" if row["sharding_label"] == "iid" else "NonIid"


def _setting(row) -> str:
    return "--" if row is None else f"{number(row['sparsity'])}, $R{{=}}{int(row['calibration_rounds'])}$"


# --------------------------------------------------------------------------- tables


def _shards_tex(root) -> str:
    t = results.shard_table(root)
    return booktabs(
        {
            "sharding": t["scheme"].map(sharding_tex),
            "samples": t["samples_min"].combine(t["samples_max"], _span),
            "classes": t["classes_min"].combine(t["classes_max"], _span),
            "largest class": t["largest_class_share"].map("{:.2f}".format),
        }
    )


def _centralized_tex(root) -> str:
    t = results.centralized_table(root)
    return booktabs(
        {
            "scheduler": t["scheduler"].map(escape),
            "lr, wd": t["lr"].map(number) + ", " + t["weight_decay"].map(number),
            "val.\\ (\\%)": (t["val"] * 100).map("{:.1f}".format),
            "test (\\%)": t.apply(cell, axis=1),
            "$n$": t["n"],
            "epochs to 99\\,\\%": t["epochs_to_99"].map(number),
        }
    )


def _fedavg_tex(root) -> str:
    t = results.fedavg_table(root)
    return booktabs(
        {
            "method": t["method"].map(escape),
            "test (\\%)": t.apply(cell, axis=1),
            "$n$": t["n"],
            "images (k)": thousands(t["trained_images"]),
            f"val.\\ at {integer(t['budget'].iloc[0])} (\\%)": t["val_at_budget"].map(share),
        }
    )


def _sparse_tex(root) -> str:
    """Per sharding the dense references and the sparse setting chosen on validation, then the centralized
    sparse baseline: images trained on, the share of steps the clip scaled down, test accuracy."""
    t = results.sparse_table(root)
    kept = t[(t["method"] != "sparse") | t["chosen"]]
    # sparse_table lists the head alone after the runs of every sharding: rows by sharding instead
    rows = pd.concat([group for _, group in kept.groupby("sharding_label", sort=False)])
    with contextlib.suppress(NoResults):  # notebook 04's centralized baseline has not run
        central = results.sparse_central_table(root).assign(method="centralized sparse", chosen=False)
        rows = pd.concat([rows, central.assign(sharding_label="--")], ignore_index=True)
    return booktabs(
        {
            "method": rows.apply(_method, axis=1),
            "sharding": rows["sharding_label"].map(sharding_tex),
            "images (k)": thousands(rows["trained_images"]),
            "clipped (\\%)": rows["clip_fraction"].map(share),
            "test (\\%)": rows.apply(cell, axis=1),
        }
    )


def _method(row) -> str:
    """A sparse table's method: a sparse run's with its sparsity and R."""
    return escape(row["method"]) + (f" {_setting(row)}" if "sparse" in row["method"] else "")


def _rules_tex(root) -> str:
    """A row per rule; a column per sharding and sparsity."""
    t = results.rules_table(root)
    columns = list(itertools.product(t["sharding_label"].unique(), sorted(t["sparsity"].unique())))
    rows = [
        [
            rule.replace("_", " "),
            *[cell(_row(t, rule=rule, sharding_label=label, sparsity=s)) for label, s in columns],
            _span(t["n"].min(), t["n"].max()),
            _span(*thousands(t.loc[t["rule"] == rule, "trained_images"].agg(["min", "max"]))),
        ]
        for rule in t["rule"].unique()
    ]
    header = [f"{sharding_tex(label)}, $s{{=}}{number(s)}$" for label, s in columns]
    return booktabs(rows, ["rule", *header, "$n$", "images (k)"])


def _interference_tex(root) -> str:
    """Mean pairwise cosine and sign agreement of client deltas per rule and sharding, at RulesSparsity."""
    t = results.interference_table(root)
    names = {"mean_pairwise_cosine": "cosine", "sign_agreement": "sign agr."}
    wide = t[t["sparsity"] == t["sparsity"].min()].pivot_table(
        index="rule", columns="sharding_label", values=list(names), sort=False
    )
    frame = wide.map("{:.3f}".format)
    frame.columns = [f"{names[v]} {sharding_tex(label)}" for v, label in wide.columns]
    return booktabs(frame.rename(index=lambda rule: rule.replace("_", " ")).reset_index())


def _remedies_tex(root) -> str:
    """Per sharding and method: images trained on, the round-mean sign conflict and sign agreement of its
    client deltas, test accuracy ($^\\star$: the best on validation per sharding), seeds."""
    t = results.remedy_table(root)
    return booktabs(
        {
            "method": t["method"].map(escape),
            "sharding": t["sharding_label"].map(sharding_tex),
            "images (k)": thousands(t["trained_images"]),
            "conflict (\\%)": t["sign_conflict_fraction"].map(share),
            "agreement": t["sign_agreement"].map("{:.3f}".format),
            "test (\\%)": t.apply(cell, axis=1),
            "$n$": t["n"],
        }
    )


# --------------------------------------------------------------------------- macros, one function per section


def _overview(root, profile: str) -> dict:
    return {
        "ResultsProfile": escape(profile),
        "ResultsNotice": "" if profile == "full" else NOTICE % {"profile": escape(profile)},
    }


def _data(root, profile: str) -> dict:
    images = results.split_table(root).set_index("split")["images"]
    held_out = images["validation"] / (images["train"] + images["validation"])
    return {
        "TrainSize": integer(images["train"]),
        "ValSize": integer(images["validation"]),
        "TestSize": integer(images["test"]),
        "ValFraction": f"{held_out * 100:.0f}\\,\\%",
        "NumClients": integer(results.shard_table(root)["clients"].max()),
        "DataProvenance": f"profile {escape(profile)}, shards of one seed",
    }


def _search(root, profile: str) -> dict:
    """Notebook 01's lr x weight decay grid, run under every scheduler (each gets its own choice)."""
    table, runs = results.lr_search_table(root), results.load_runs(root, LR_SEARCH)
    return {
        "SearchGrid": f"learning rates \\{{{listing(table['lr'])}\\}} and weight decays "
        f"\\{{{listing(table['weight_decay'])}\\}} under each scheduler "
        f"({', '.join(map(escape, runs['scheduler'].unique()))}), "
        f"a {listing(runs['epochs'])}-epoch budget each",
        "SearchProvenance": provenance(profile, table),
    }


def used(root, key: str, chosen: float) -> float:
    """The value the study's runs used (hparams.json `key`): the search's choice unless the notebook set
    its own; `chosen` where the study has not recorded one."""
    path = Path(root, "hparams.json")
    return json.loads(path.read_text()).get(key, chosen) if path.is_file() else chosen


def _client_searches(root, profile: str) -> dict:
    """Notebook 02's client lr x weight decay search and notebook 04's lr search under the frozen head."""
    values = {}
    for prefix, experiment, decays in (
        ("FedAvg", FEDAVG_LR_SEARCH, "and weight decays"),
        ("Sparse", SPARSE_LR_SEARCH, "at 02's weight decay"),  # SparseChosenWeightDecay: no macro
    ):
        if (runs := results.load_runs(root, experiment)).empty:
            continue
        best = _row(results.lr_search_table(root, experiment), chosen=True)
        values[f"{prefix}SearchGrid"] = (
            f"client learning rates \\{{{listing(runs['lr'])}\\}} "
            f"{decays} \\{{{listing(runs['weight_decay'])}\\}}, "
            f"{listing(runs['rounds'])} rounds each"
        )
        # hparams.json's keys: fedavg_lr, sparse_lr
        values[f"{prefix}ChosenLr"] = number(used(root, f"{prefix.lower()}_lr", best["lr"]))
        values[f"{prefix}ChosenWeightDecay"] = number(used(root, "fedavg_weight_decay", best["weight_decay"]))
    return values


def _centralized(root, profile: str) -> dict:
    table, runs = results.centralized_table(root), results.load_runs(root, CENTRALIZED)
    best = _row(table, chosen=True)
    return {
        "CentralizedSetting": f"{listing(runs['epochs'])} epochs of batch {listing(runs['batch_size'])}, "
        f"warm-up {listing(runs['warmup_epochs'])} epochs",
        "BestScheduler": escape(best["scheduler"]),
        "ChosenLr": number(used(root, "central_lr", best["lr"])),
        "ChosenWeightDecay": number(used(root, "central_weight_decay", best["weight_decay"])),
        "CentralizedBestAcc": percent(best),
        "CentralizedProvenance": provenance(profile, table),
    }


def _fedavg(root, profile: str) -> dict:
    table, runs = results.fedavg_table(root), results.load_runs(root, FEDAVG_IID)
    return {
        "FedAvgSetting": f"$K{{=}}{listing(runs['num_clients'])}$ clients, "
        f"$C{{=}}{listing(runs['participation'])}$ ({listing(results.participants(runs))} per round), "
        f"$J{{=}}{listing(runs['local_steps'])}$ local steps of "
        f"$B{{=}}{listing(runs['batch_size'])}$ images, "
        f"{listing(runs['rounds'])} rounds",
        "FedAvgIidAcc": percent(_row(table, method="FedAvg (iid)")),
        "EqualSamplesBudget": integer(table["budget"].iloc[0]),
        "FedAvgProvenance": provenance(profile, table),
    }


def _heterogeneity(root, profile: str) -> dict:
    table, runs = results.heterogeneity_table(root), results.load_runs(root, HETEROGENEITY)
    return {
        "HeteroGrid": f"$N_c \\in \\{{{listing(runs.get('classes_per_client'))}\\}}$ and "
        f"$J \\in \\{{{listing(runs['local_steps'])}\\}}$, rounds $\\times J = "
        f"{listing(runs['rounds'] * runs['local_steps'])}$",
        "HeteroProvenance": provenance(profile, table),
    }


def _sparse(root, profile: str) -> dict:
    table, runs = results.sparse_table(root), results.load_runs(root, SPARSE_FL)
    sweep = sweeps(table[table["sharding_label"] == "iid"])
    at_r, at_s = sweep["sparsity"], sweep["calibration_rounds"]
    heads = runs[runs["finetune.head"] == "ridge"]
    fixed = heads["finetune.ridge_lambda"].notna().all()  # else each run chose it (summary's ridge_lambda)
    ridge = (
        f"{listing(heads.get('ridge_lambda', heads['finetune.ridge_lambda']))} "
        f"({'fixed' if fixed else 'chosen on validation'})"
    )
    values = {
        "SparseSetting": f"$J{{=}}{listing(runs['local_steps'])}$, {listing(runs['rounds'])} rounds; "
        f"on iid shards sparsity $s \\in \\{{{listing(at_r['sparsity'])}\\}}$ at "
        f"$R{{=}}{listing(at_r['calibration_rounds'])}$ and $R \\in "
        f"\\{{{listing(at_s['calibration_rounds'])}\\}}$ at "
        f"$s{{=}}{listing(at_s['sparsity'])}$; "
        f"$N_c{{=}}{listing(runs.get('classes_per_client'))}$ shards at that default, "
        f"{listing(runs['finetune.calibration_samples'])} Fisher samples per round, "
        f"ridge penalty {ridge}",
        "SparseProvenance": provenance(profile, table),
    }
    for _, best in table[table["chosen"]].iterrows():
        values[f"Sparse{_regime(best)}BestAcc"] = percent(best)
        if (dense := _row(table, sharding_label=best["sharding_label"], method="FedAvg")) is not None:
            values[f"Sparse{_regime(best)}BestGap"] = f"${(best['mean'] - dense['mean']) * 100:+.1f}$"
    return values


def _sparse_central(root, profile: str) -> dict:
    row = results.sparse_central_table(root).iloc[0]
    return {
        "SparseCentralAcc": percent(row),
        "SparseCentralSetting": _setting(row),
        "SparseCentralScheduler": escape(row["scheduler"]),
        "SparseCentralLr": number(row["lr"]),
    }


def _rules(root, profile: str) -> dict:
    table, runs = results.rules_table(root), results.load_runs(root, MASK_RULES)
    sparsity = table["sparsity"].min()
    values = {
        "RulesSetting": f"sparsity $s \\in \\{{{listing(table['sparsity'])}\\}}$, "
        f"$R{{=}}{listing(runs['calibration_rounds'])}$",
        "RulesSparsity": number(sparsity),
        "RulesProvenance": provenance(profile, table),
    }
    for _, best in table[table["chosen"] & (table["sparsity"] == sparsity)].iterrows():
        values[f"Rules{_regime(best)}BestRule"] = best["rule"].replace("_", " ")
        values[f"Rules{_regime(best)}BestAcc"] = percent(best)
    return values


# The values notebook 06's searches choose, per method: config field -> its symbol in the report.
SEARCHED_SYMBOLS = {
    "FedAvgM": {"server_lr": r"\eta_s", "server_momentum": r"\beta"},
    "FedProx": {"prox_mu": r"\mu"},
    "TIES": {"ties_density": "p", "server_lr": r"\lambda"},
}


def _remedies(root, profile: str) -> dict:
    """Notebook 06: its setting, the values its runs used, SCAFFOLD's state, and per non-iid sharding
    the method validation chooses (_best_remedy)."""
    table, runs = results.remedy_table(root), results.load_runs(root, REMEDIES)
    used_values = [
        f"{method} "
        + ", ".join(f"${symbol}{{=}}{number(rows[field].iloc[0])}$" for field, symbol in fields.items())
        for method, fields in SEARCHED_SYMBOLS.items()
        if not (rows := runs[runs["method"] == method]).empty
    ]
    non_iid = table[(table["sharding_label"] != "iid") & table["val"].notna()]
    values = {
        "RemedySetting": f"$J{{=}}{listing(runs['local_steps'])}$, {listing(runs['rounds'])} rounds, on "
        f"$N_c \\in {braces(runs['classes_per_client'])}$ (FedAvg and sparse FedAvg also on iid shards)",
        "RemedyChosen": "; ".join(used_values) or "--",
        "RemedyBest": ", ".join(
            _best_remedy(label, group) for label, group in non_iid.groupby("sharding_label", sort=False)
        ),
        "RemedyProvenance": provenance(profile, table),
    }
    scaffold = runs[runs["method"] == "SCAFFOLD (sparse)"]
    if len(scaffold):  # float32: the server's variate and one per client
        state = 4 * scaffold["trainable_entries"].iloc[0] * (scaffold["num_clients"].iloc[0] + 1)
        values["RemedyScaffoldState"] = f"{state / 1e9:.2f}\\,GB"
    return values


def _remedy_searches(root, profile: str) -> dict:
    """Notebook 06's three searches, as one sentence."""
    server, prox, ties = (
        results.complete_runs(root, e) for e in (FEDAVGM_SEARCH, FEDPROX_SEARCH, TIES_SEARCH)
    )
    return {
        "RemedySearches": f"server lr {braces(server['server_lr'])} $\\times$ momentum "
        f"{braces(server['server_momentum'])} (FedAvgM), $\\mu \\in {braces(prox['prox_mu'])}$ (FedProx), "
        f"$p \\in {braces(ties['ties_density'])} \\times \\lambda \\in {braces(ties['server_lr'])}$ (TIES), "
        f"{listing(server['rounds'])} rounds each on "
        f"{sharding_tex(server['sharding_label'].iloc[0])}, one seed",
    }


def _best_remedy(label, group: pd.DataFrame) -> str:
    """'TIES on $N_c{=}1$ (acc; +x points over FedAvgM)': the method validation chooses on one sharding,
    against the best on validation of its own family: a dense method against FedAvg at its best server
    step (FedAvg or FedAvgM), one under the frozen head against sparse FedAvg (the head is not the
    method's gain)."""
    top = results.choose(group)
    top = top[top["chosen"]].iloc[0]
    text = f"{escape(top['method'])} on {sharding_tex(label)} ({percent(top)}"
    family = ["sparse"] if "sparse" in top["method"] else ["FedAvg", "FedAvgM"]
    references = results.choose(
        group, among=group["method"].isin(family) & (group["method"] != top["method"])
    )
    if references["chosen"].any():
        reference = references[references["chosen"]].iloc[0]
        text += f"; {(top['mean'] - reference['mean']) * 100:+.1f} points over {escape(reference['method'])}"
    return text + ")"


# --------------------------------------------------------------------------- writing and building

FIGURES = {
    "lr_search": figures.lr_search_heatmap,
    "centralized_curves": figures.centralized_curves,
    "fedavg_vs_central": figures.fedavg_vs_centralized,
    "heterogeneity_heatmap": figures.heterogeneity_heatmap,
    "heterogeneity_curves": figures.heterogeneity_curves,
    "drift": figures.drift_figure,
    "sparsity": figures.sparsity_figure,
    "mask_rules": figures.mask_rules_figure,
    "mask_overlap": figures.mask_overlap_heatmap,
    "layer_density": figures.block_density_figure,
    "remedies": figures.remedies_figure,
    "remedy_curves": figures.remedy_curves,
}
TABLES = {
    "shards": _shards_tex,
    "centralized": _centralized_tex,
    "fedavg": _fedavg_tex,
    "sparse": _sparse_tex,
    "mask_rules": _rules_tex,
    "rule_interference": _interference_tex,
    "remedies": _remedies_tex,
}
SECTIONS = (
    _overview,
    _data,
    _search,
    _centralized,
    _client_searches,
    _fedavg,
    _heterogeneity,
    _sparse,
    _sparse_central,
    _rules,
    _remedies,
    _remedy_searches,
)


def _attempt(make, name: str, root, warnings: list, *args):
    """make(root, *args), or None with a warning; a missing experiment is already warned about."""
    try:
        return make(root, *args)
    except NoResults:
        return None
    except Exception as error:  # partial or odd results must not cost the rest of the report
        warnings.append(f"{name} failed ({type(error).__name__}: {error}); a placeholder stands in")
        return None


def write_report(root, report_dir, profile: str) -> list[str]:
    """Every figure, table and numbers.tex of the report from the results under `root`; the warnings."""
    root, report_dir = Path(root), Path(report_dir)
    warnings = [
        f"no results for {e} under {root}: its figures, tables and numbers are placeholders"
        for e in EXPERIMENTS
        if results.load_runs(root, e).empty
    ]
    if not (root / results.DATA / "shard_stats.csv").is_file():
        warnings.append(f"no results for {results.DATA} under {root}: its table and numbers are placeholders")
    for name, draw in FIGURES.items():
        fig = _attempt(draw, f"figure {name}", root, warnings, profile)
        if fig is None:
            fig = figures.placeholder(f"{name}: could not be drawn (profile {profile})", warnings[-1][:120])
            fig.set_size_inches(draw.size[0], draw.size[0] * draw.size[1])
        figures.save(fig, report_dir / "figures" / name)
        plt.close(fig)
    for name, make in TABLES.items():
        text = _attempt(make, f"table {name}", root, warnings) or booktabs(
            {"placeholder": [f"\\textit{{No results yet for {escape(name)} (profile {escape(profile)})}}"]}
        )
        _write(report_dir / "tables" / f"{name}.tex", text)
    values = {}
    for section in SECTIONS:
        values.update(_attempt(section, f"numbers of {section.__name__[1:]}", root, warnings, profile) or {})
    _write(report_dir / "generated" / "numbers.tex", numbers_tex(values, profile))
    return warnings


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def numbers_tex(values: dict, profile: str) -> str:
    """numbers.tex: a \\newcommand per MACROS entry: its value, else n/a (captions: 'no results yet')."""
    lines = [
        f"% Generated by fedta_utils.report from the {profile} results; rerun notebook 07, do not edit.",
        "% Accuracies: mean +- std over seeds (ddof=1, 0 for one seed). Requires \\usepackage{xspace}.",
    ]
    for name, comment in MACROS.items():
        missing = f"profile {escape(profile)}, no results yet" if name.endswith("Provenance") else NA
        lines.append(f"\\newcommand{{\\{name}}}{{{values.get(name, missing)}\\xspace}}  % {comment}")
    return "\n".join(lines) + "\n"


def read_numbers(path) -> dict:
    """numbers.tex back as {name: value} (value without its trailing \\xspace)."""
    pattern = re.compile(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\\xspace\}  % ")
    return dict(m.groups() for line in Path(path).read_text().splitlines() if (m := pattern.match(line)))


def resolve_report_dir(report_dir) -> Path:
    """An absolute report_dir as given; a relative one inside the repository (where main.tex lives)."""
    return REPO_ROOT / report_dir  # pathlib: an absolute right-hand side replaces REPO_ROOT


def page_counts(report_dir) -> dict:
    """pages (main.log's 'Output written' line) and body_pages (the page of LastBodyPage in main.aux)."""
    found = {}
    for key, name, pattern in (
        ("pages", "main.log", r"Output written on \S+ \((\d+) pages?"),
        ("body_pages", "main.aux", r"\\newlabel\{LastBodyPage\}\{\{[^}]*\}\{(\d+)\}"),
    ):
        path = Path(report_dir, name)
        match = re.search(pattern, path.read_text(errors="replace")) if path.is_file() else None
        found[key] = int(match.group(1)) if match else None
    return found


def build_pdf(report_dir, timeout: int = 600) -> dict:
    """latexmk -pdf on <report_dir>/main.tex: {'ok', 'seconds', 'pages', 'body_pages', 'log_tail'}.

    Raises FileNotFoundError, with the install command, where latexmk is not installed.
    """
    if shutil.which("latexmk") is None:
        raise FileNotFoundError(f"latexmk is not installed; on Debian/Ubuntu: {INSTALL_TEX}")
    started = time.perf_counter()
    done = subprocess.run(
        ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
        cwd=report_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return {
        "ok": done.returncode == 0,
        "seconds": time.perf_counter() - started,
        **page_counts(report_dir),
        "log_tail": "\n".join((done.stdout + done.stderr).splitlines()[-40:]),
    }


ARCHIVED = {
    "report.zip": ("main.tex", "refs.bib", "figures/*.pdf", "tables/*.tex", "generated/*.tex"),
    "results.zip": ("hparams.json", f"{results.DATA}/*.csv", "grids/*.json"),
}
RUN_FILES = (
    "config.json",
    "summary.json",
    "metrics.csv",
)  # of each run a recorded grid names, in results.zip


def archive(report_dir, root) -> list[Path]:
    """<root>/report.zip, a project Overleaf opens as it is, and <root>/results.zip, the evidence behind it.

    results.zip holds the recorded grids and, under runs/<run id>/, the config, metrics and summary of
    every run they name (the runs the tables' numbers come from), the masks (prepared.pt) of the runs
    the mask tables compare, and no checkpoint.
    """
    root = Path(root)
    for name, patterns in ARCHIVED.items():
        base = Path(report_dir) if name == "report.zip" else root
        files = {f for pattern in patterns for f in base.glob(pattern)}
        if name == "results.zip":
            files |= {folder / file for folder in grid_folders(root) for file in RUN_FILES}
            with contextlib.suppress(NoResults):  # no mask-rule runs yet
                files |= {Path(run_dir, "prepared.pt") for run_dir in results.mask_runs(root)["run_dir"]}
        with zipfile.ZipFile(root / name, "w", zipfile.ZIP_DEFLATED) as bundle:
            for file in sorted(f for f in files if f.is_file()):
                bundle.write(file, file.relative_to(base))
    return [root / name for name in ARCHIVED]


def grid_folders(root) -> set[Path]:
    """The folders of the complete runs that any recorded grid names."""
    grids = Path(root, GRIDS_DIR).glob("*.json")
    return {folder for grid in grids for folder in grid_runs(root, grid.stem)}
