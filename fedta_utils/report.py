r"""Report assets generated from results: figures, booktabs tables, and the numbers of the text.

    warnings = generate_report_assets("results/full", "report", "full")

reads every experiment under a results root (<results_dir>/<profile>) and writes

    <report_dir>/figures/<stem>.pdf (+ .png)   plots.py figures, one theme
    <report_dir>/tables/<stem>.tex             booktabs tabulars (main.tex adds the float and caption)
    <report_dir>/generated/numbers.tex         \newcommand macros: accuracies, gaps, thresholds, seed counts

Accuracies are aggregated over seeds (mean +- std with ddof=1, and n) from the
same CSVs the notebooks read, so the report never holds a hand-copied number.
An experiment without results gives placeholder figures and tables, macros
that read "n/a (no results)", and a warning, never an exception: the report
still builds, and the gap is visible in the PDF. Every caption macro names the
profile and the seed count, so a smoke build cannot pass for real results.

build_pdf() runs latexmk on <report_dir>/main.tex and reports the page count.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import analysis, plots
from .experiments import (CENTRALIZED, FEDAVG_IID, HEAD_ONLY, HETEROGENEITY, LR_SEARCH, MASK_RULES, SPARSE_CENTRAL,
                          SPARSE_FL, best_search_result, load_experiment)
from .data import CROP_PADDING
from .heads import LOGIT_SCALES
from .runs import read_metrics
from .schedules import STEP_GAMMA, STEP_MILESTONES
from .sensitivity import ATTENUATION, RULES

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = "00_data"  # notebook 00 writes shard_stats.csv and split_sizes.csv here
NA = r"\textit{n/a (no results)}"
BODY_PAGE_LIMIT = 8  # the course's limit, references excluded
FULL, COLUMN = plots.FULL_WIDTH, plots.COLUMN_WIDTH

# Every figure main.tex includes: stem -> (experiment it comes from, width in inches, height / width).
# The size is also the placeholder's, so a missing experiment does not change the layout.
FIGURES = {
    "shard_stats": (DATA, FULL, 0.32),
    "lr_search": (LR_SEARCH, COLUMN, 0.8),
    "centralized_curves": (CENTRALIZED, FULL, 0.36),
    "fedavg_vs_central": (FEDAVG_IID, FULL, 0.36),
    "heterogeneity_heatmap": (HETEROGENEITY, COLUMN, 0.8),
    "heterogeneity_curves": (HETEROGENEITY, FULL, 0.3),
    "drift": (HETEROGENEITY, FULL, 0.28),
    "sparsity": (SPARSE_FL, FULL, 0.32),
    "calibration_rounds": (SPARSE_FL, FULL, 0.32),
    "mask_rules": (MASK_RULES, FULL, 0.3),
    "mask_overlap": (MASK_RULES, COLUMN, 0.8),
    "layer_density": (MASK_RULES, COLUMN, 0.75),
}

# Every table main.tex inputs: stem -> the experiment it comes from.
TABLES = {
    "shards": DATA,
    "centralized": CENTRALIZED,
    "fedavg": FEDAVG_IID,
    "heterogeneity": HETEROGENEITY,
    "sparse": SPARSE_FL,
    "sparse_grid": SPARSE_FL,
    "mask_rules": MASK_RULES,
    "rule_interference": MASK_RULES,
}

SHARDING_KEYS = {"iid": "Iid", "non_iid": "NonIid"}  # macro spelling of the two shardings of notebooks 04-05
RULE_KEYS = {rule: "".join(part.capitalize() for part in rule.split("_")) for rule in RULES}
SCHEDULER_KEYS = {"cosine": "Cosine", "step": "Step", "constant": "Constant"}


def _macro_registry() -> dict[str, str]:
    """Every macro numbers.tex defines, with the comment written beside it."""
    macros = {
        "ResultsProfile": "profile the results come from (smoke or full)",
        "ResultsDataset": "dataset of the runs",
        "ResultsModel": "model of the runs",
        "ResultsNotice": "a warning box unless the profile is full (empty for full)",
        "Attenuation": "factor on frozen entries while later calibration rounds are scored (code constant)",
        "CropPadding": "zero padding of the random crop, pixels (code constant)",
        "StepGamma": "step schedule: factor of each drop (code constant)",
        "StepMilestones": "step schedule: fractions of training at which the rate drops (code constant)",
        "LogitScaleGrid": "the logit scales the ridge head chooses from (code constant)",
        "ValFraction": "share of the official train set held out for validation (%)",
        "WarmupEpochs": "linear warm-up of the centralized runs, epochs",
        "TrainSize": "images in the train split", "ValSize": "images in the validation split",
        "TestSize": "images in the test set", "NumClients": "K, clients of the shardings of notebook 00",
        "DataProvenance": "caption provenance of notebook 00",
        "SearchRuns": "runs of the learning-rate search", "SearchEpochs": "epochs of each search run",
        "SearchLrs": "learning rates searched", "SearchWeightDecays": "weight decays searched",
        "ChosenLr": "learning rate chosen on validation", "ChosenWeightDecay": "weight decay chosen on validation",
        "SearchValAcc": "validation accuracy of the chosen pair (%)",
        "SearchProvenance": "caption provenance of the search",
        "CentralizedSeeds": "seeds per scheduler", "CentralizedEpochs": "epochs of the centralized runs",
        "CentralizedBatchSize": "images per centralized step", "SchedulerList": "schedulers compared",
        "BestScheduler": "scheduler with the highest mean final test accuracy",
        "CentralizedBestAcc": "final test accuracy of the best scheduler, mean +- std (%)",
        "CentralizedAcc": "final test accuracy of the cosine runs (the reference of notebook 02), mean +- std (%)",
        "SchedulerGap": "best minus worst scheduler, points",
        "CentralizedEpochsToNinetyNine": "epochs the best scheduler needs to reach 99 % of its final accuracy",
        "CentralizedProvenance": "caption provenance of the centralized runs",
        "FedAvgSeeds": "seeds of FedAvg iid", "FedAvgRounds": "rounds of FedAvg iid",
        "FedAvgLocalSteps": "J of FedAvg iid", "FedAvgBatchSize": "B of FedAvg iid",
        "FedAvgClients": "K of FedAvg iid", "FedAvgParticipation": "C of FedAvg iid",
        "FedAvgClientsPerRound": "max(1, round(C K))",
        "FedAvgIidAcc": "final test accuracy of FedAvg iid, mean +- std (%)",
        "FedAvgCentralGap": "centralized cosine minus FedAvg iid final accuracy, points",
        "EqualSamplesBudget": "training images both methods processed (the smaller total)",
        "FedAvgAccAtEqualSamples": "FedAvg test accuracy at that budget (%)",
        "CentralAccAtEqualSamples": "centralized test accuracy at that budget (%)",
        "FedAvgProvenance": "caption provenance of notebook 02",
        "HeteroSeeds": "seeds per heterogeneity cell", "HeteroNcList": "Nc values of the grid",
        "HeteroJList": "J values of the grid", "HeteroStepBudget": "rounds x J of every run",
        "HeteroIidAcc": "iid accuracy at the smallest J (%)",
        "HeteroBestSetting": "highest-accuracy cell", "HeteroBestAcc": "its accuracy (%)",
        "HeteroWorstSetting": "lowest-accuracy cell", "HeteroWorstAcc": "its accuracy (%)",
        "HeteroWorstGap": "iid at the same J minus the lowest cell, points",
        "HeteroCosineCorrelation": "Spearman correlation of accuracy and mean pairwise cosine over cells",
        "HeteroLowestCosineSetting": "cell whose client deltas agree least",
        "HeteroLowestCosine": "its mean pairwise cosine", "HeteroLowestCosineSignAgreement": "its sign agreement",
        "HeteroIidCosine": "mean pairwise cosine of iid at the smallest J",
        "HeteroProvenance": "caption provenance of notebook 03",
        "SparseSeeds": "seeds of sparse FedAvg", "SparseRounds": "rounds of sparse FedAvg",
        "SparseLocalSteps": "J of sparse FedAvg", "SparseNc": "Nc of the non-iid sharding of notebooks 04-05",
        "SparsityList": "sparsities of the grid", "CalibrationRoundsList": "R values of the grid",
        "CalibrationSamples": "Fisher samples per calibration round", "RidgeLambda": "ridge penalty of the head",
        "LogitScale": "logit scale chosen for the ridge head (iid, first seed)",
        "SparseCentralAcc": "centralized sparse fine-tuning, mean +- std (%)",
        "SparseCentralSparsity": "its sparsity", "SparseCentralRounds": "its R", "SparseCentralSeeds": "its seeds",
        "SparseCentralProvenance": "caption provenance of the centralized sparse runs",
        "SparseProvenance": "caption provenance of notebook 04",
        "RulesSeeds": "seeds per rule", "RulesSparsityList": "sparsities of the rule comparison",
        "RulesSparsity": "sparsity of the rule macros below", "RulesRounds": "R of every rule",
        "RulesOverlapLeastMost": "Jaccard overlap of least- and most-sensitive masks (iid, first seed)",
        "RulesOverlapLeastLowest": "Jaccard overlap of least-sensitive and lowest-magnitude masks",
        "RulesOverlapLeastHighest": "Jaccard overlap of least-sensitive and highest-magnitude masks",
        "RulesOverlapLeastRandom": "Jaccard overlap of least-sensitive and random masks",
        "RulesProvenance": "caption provenance of notebook 05",
    }
    for scheduler, key in SCHEDULER_KEYS.items():
        macros[f"Centralized{key}Acc"] = f"final test accuracy with the {scheduler} scheduler, mean +- std (%)"
    for key in SHARDING_KEYS.values():
        macros.update({
            f"Sparse{key}BestAcc": "best sparse setting, mean +- std (%)",
            f"Sparse{key}BestSparsity": "its sparsity", f"Sparse{key}BestRounds": "its R",
            f"Sparse{key}BestThreshold": "its last-round Fisher threshold (mean over seeds)",
            f"Sparse{key}BestGap": "best sparse minus dense FedAvg, points",
            f"Sparse{key}FedAvgAcc": "dense FedAvg (trained head), same rounds (%)",
            f"Sparse{key}DenseHeadAcc": "dense backbone with the frozen step-0 head (%)",
            f"Sparse{key}HeadOnlyAcc": "the step-0 head alone, no fine-tuning (%)",
            f"Sparse{key}BestRoundsAveraged": "R with the best accuracy averaged over sparsities",
            f"Rules{key}BestRule": "rule with the highest accuracy at RulesSparsity",
            f"Rules{key}BestAcc": "its accuracy (%)",
            f"Rules{key}WorstRule": "rule with the lowest accuracy", f"Rules{key}WorstAcc": "its accuracy (%)",
            f"Rules{key}Lead": "best minus second-best rule, points",
            f"Rules{key}LeadStd": "sum of the two rules' seed std, points",
        })
        for rule, rule_key in RULE_KEYS.items():
            macros[f"Rules{key}{rule_key}Acc"] = f"{rule} at RulesSparsity (%)"
    return macros


MACROS = _macro_registry()


# =========================================================================== formatting

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    """Text with LaTeX's special characters escaped, safe in text mode."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in str(text))


def is_macro_name(name: str) -> bool:
    """LaTeX control words are letters only."""
    return bool(re.fullmatch(r"[A-Za-z]+", name))


def percent(mean: float, std: float) -> str:
    """Text-mode 'mean +- std %' of an accuracy given as a fraction."""
    return f"{mean * 100:.1f}\\,$\\pm$\\,{std * 100:.1f}\\,\\%"


def cell(mean: float, std: float) -> str:
    """A table cell 'mean +- std' in percent (the header carries the unit)."""
    if pd.isna(mean):
        return "--"
    return f"${mean * 100:.1f} \\pm {std * 100:.1f}$"


def single_percent(value: float) -> str:
    return f"{value * 100:.1f}\\,\\%"


def points(value: float) -> str:
    """A signed difference of two accuracies (fractions), in percentage points."""
    return f"${value * 100:+.1f}$"


def number(value) -> str:
    """A plain number: scientific notation when it is tiny or huge, else the shortest form."""
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"${float(mantissa):g}\\times10^{{{int(exponent)}}}$"


def integer(value) -> str:
    """An integer with a thin thousands separator: 45{,}000."""
    return f"{int(value):,}".replace(",", "{,}")


def listing(values) -> str:
    return ", ".join(number(v) for v in values)


def sharding_tex(label: str) -> str:
    """'Nc=5' -> '$N_c{=}5$', 'iid' -> 'iid', 'Dir(0.1)' -> 'Dir(0.1)'."""
    match = re.fullmatch(r"Nc=(\d+)", str(label))
    return f"$N_c{{=}}{match.group(1)}$" if match else latex_escape(label)


def setting_tex(label: str, local_steps) -> str:
    return f"{sharding_tex(label)}, $J{{=}}{int(local_steps)}$"


def seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def count_range(counts) -> str:
    """Seeds per cell: '3', or '2--3' when cells differ."""
    low, high = int(min(counts)), int(max(counts))
    return str(low) if low == high else f"{low}--{high}"


def booktabs(header: list[str], rows: list[list[str]], align: str) -> str:
    """A booktabs tabular; cells are LaTeX already (escape text with latex_escape first)."""
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def placeholder_table(experiment: str, profile: str) -> str:
    """A one-cell table that says plainly which experiment has no results yet."""
    text = f"\\textit{{No results yet for {latex_escape(experiment)} (profile {latex_escape(profile)})}}"
    return booktabs(["\\textbf{placeholder}"], [[text]], "l")


# =========================================================================== the writer

@dataclass
class ReportWriter:
    """Collects what the sections produce and writes it under report_dir."""

    root: Path
    report_dir: Path
    profile: str
    macros: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    figures: set = field(default_factory=set)
    tables: set = field(default_factory=set)
    _frames: dict = field(default_factory=dict)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def set(self, name: str, value) -> None:
        if name not in MACROS:
            raise KeyError(f"macro {name!r} is not in report.MACROS")
        self.macros[name] = str(value)

    def experiment(self, name: str) -> pd.DataFrame:
        """Complete runs of `name` (memoised); an empty frame, with a warning, when there are none."""
        if name not in self._frames:
            frame = load_experiment(self.root, name)
            if frame.empty:
                self.warn(f"no results for {name} under {self.root}: its figures and tables are placeholders")
            self._frames[name] = frame
        return self._frames[name]

    def csv(self, relative: str) -> pd.DataFrame:
        path = self.root / relative
        if not path.is_file():
            self.warn(f"{path} does not exist (run notebook 00): its figure and table are placeholders")
            return pd.DataFrame()
        return pd.read_csv(path)

    def figure(self, stem: str, build: Callable[[], object]) -> None:
        """Save the figure `build()` returns; if it fails, say why and leave the placeholder to finish()."""
        try:
            fig = build()
        except Exception as error:  # one broken figure must not cost the whole report
            self.warn(f"figure {stem} could not be drawn ({type(error).__name__}: {error}); placeholder used")
            return
        plots.save(fig, self.report_dir / "figures" / stem)
        plt.close(fig)
        self.figures.add(stem)

    def table(self, stem: str, text: str) -> None:
        path = self.report_dir / "tables" / f"{stem}.tex"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.tables.add(stem)

    def finish(self) -> None:
        """Placeholders for every figure and table no section wrote, then numbers.tex."""
        for stem, (experiment, width, aspect) in FIGURES.items():
            if stem not in self.figures:
                fig = plots.placeholder(f"No results yet: {experiment}",
                                        f"profile {self.profile}; run its notebook, then notebook 06",
                                        width=width, aspect=min(aspect, 0.45))
                plots.save(fig, self.report_dir / "figures" / stem)
                plt.close(fig)
        for stem, experiment in TABLES.items():
            if stem not in self.tables:
                self.table(stem, placeholder_table(experiment, self.profile))
        write_numbers(self.report_dir / "generated" / "numbers.tex", self.macros, self.profile)


def write_numbers(path: Path, macros: dict, profile: str) -> None:
    """numbers.tex: one \\newcommand per registered macro, n/a for those no section set."""
    lines = [f"% Generated by fedta_utils.report from the {profile} results. Do not edit: rerun notebook 06.",
             "% Accuracies: mean +- std over seeds (std with ddof=1, 0 for one seed); the seed counts are",
             "% the *Seeds macros. Requires \\usepackage{xspace}."]
    for name in MACROS:
        missing = f"profile {latex_escape(profile)}, no results yet" if name.endswith("Provenance") else NA
        value = macros.get(name, missing)
        lines.append(f"\\newcommand{{\\{name}}}{{{value}\\xspace}}  % {MACROS[name]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_numbers(path: str | Path) -> pd.DataFrame:
    """numbers.tex back as a table: name, value (without the trailing \\xspace), comment."""
    pattern = re.compile(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\\xspace\}  % (.*)$")
    rows = [match.groups() for line in Path(path).read_text().splitlines() if (match := pattern.match(line))]
    return pd.DataFrame(rows, columns=["name", "value", "comment"])


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
    for experiment in (CENTRALIZED, LR_SEARCH, FEDAVG_IID, HETEROGENEITY, SPARSE_FL, MASK_RULES):
        path = writer.root / experiment
        frame = load_experiment(writer.root, experiment) if path.is_dir() else pd.DataFrame()
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
    rows = [[sharding_tex(r.scheme), f"{r.samples_min}--{r.samples_max}", f"{r.classes_min}--{r.classes_max}",
             f"{r.share:.2f}"] for r in summary.itertuples()]
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
        writer.set(f"Sparse{key}BestThreshold", number(best["threshold"]))
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
    best_cells, settings = [], []
    for label in labels:
        group = sparse[sparse["sharding_label"] == label]
        if group.empty:
            best_cells.append("--"), settings.append("--")
            continue
        best = group.loc[group["mean"].idxmax()]
        best_cells.append(cell(best["mean"], best["std"]))
        settings.append(f"{number(best['sparsity'])}, $R{{=}}{int(best['calibration_rounds'])}$")
    rows += [["best sparse", *best_cells], ["\\quad at sparsity, $R$", *settings]]
    header = ["method", *[sharding_tex(l) for l in labels]]
    writer.table("sparse", booktabs(header, rows, "l" + "r" * len(labels)))
    writer.table("sparse_grid", sparse_grid_table(sparse, labels))


def sparse_grid_table(sparse: pd.DataFrame, labels: list[str]) -> str:
    """Every (sparsity, R): accuracy per sharding, the iid threshold and achieved sparsity."""
    keys = ["sparsity", "calibration_rounds"]
    grid = sparse[keys].drop_duplicates().sort_values(keys)
    indexed = sparse.set_index(["sharding_label", *keys])
    rows = []
    for sparsity, rounds in grid.itertuples(index=False):
        cells = [cell(indexed.loc[(l, sparsity, rounds), "mean"], indexed.loc[(l, sparsity, rounds), "std"])
                 if (l, sparsity, rounds) in indexed.index else "--" for l in labels]
        reference = indexed.loc[(labels[0], sparsity, rounds)] if (labels[0], sparsity, rounds) in indexed.index else None
        threshold = number(reference["threshold"]) if reference is not None and not pd.isna(reference["threshold"]) else "--"
        achieved = (f"{reference['achieved_sparsity']:.3f}" if reference is not None and "achieved_sparsity" in reference
                    and not pd.isna(reference["achieved_sparsity"]) else "--")
        rows.append([number(sparsity), str(int(rounds)), *cells, threshold, achieved])
    header = ["sparsity", "$R$", *[sharding_tex(l) for l in labels],
              f"threshold ({sharding_tex(labels[0])})", "achieved"]
    return booktabs(header, rows, "rr" + "r" * len(labels) + "rr")


def add_mask_rules(writer: ReportWriter) -> None:
    """Notebook 05: the five calibration rules (bars, table, interference), mask overlap, layer density."""
    runs = writer.experiment(MASK_RULES)
    if runs.empty:
        return
    runs = analysis.with_method_label(runs)
    warn_duplicates(writer, runs, ["sharding_label", "finetune.sparsity", "finetune.mask_rule"], MASK_RULES)
    table = analysis.mean_std(runs, ["sharding_label", "finetune.sparsity", "finetune.mask_rule"], "final_test_acc")
    table = table.rename(columns={"finetune.sparsity": "sparsity", "finetune.mask_rule": "rule"})
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
    overlap_figures(writer, runs, sparsity, seed)


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
    """Rows: rules; columns: (sharding, sparsity); cells mean +- std; n: seeds per cell."""
    columns = table[["sharding_label", "sparsity"]].drop_duplicates().itertuples(index=False)
    columns = list(columns)
    indexed = table.set_index(["rule", "sharding_label", "sparsity"])
    rows = []
    for rule in [r for r in RULES if r in set(table["rule"])]:
        cells = [cell(indexed.loc[(rule, l, s), "mean"], indexed.loc[(rule, l, s), "std"])
                 if (rule, l, s) in indexed.index else "--" for l, s in columns]
        rows.append([latex_escape(rule.replace("_", " ")), *cells, count_range(indexed.loc[rule, "n"])])
    header = ["rule", *[f"{sharding_tex(l)}, {number(s)}" for l, s in columns], "$n$"]
    return booktabs(header, rows, "l" + "r" * len(columns) + "r")


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
    header = ["rule", *[f"{kind} ({sharding_tex(l)})" for l in labels for kind in ("cos.", "sign agr.")]]
    return booktabs(header, rows, "l" + "r" * 2 * len(labels))


def overlap_figures(writer: ReportWriter, runs: pd.DataFrame, sparsity: float, seed: int) -> None:
    """Jaccard overlap between the rules' masks and their trainable fraction per block (iid, one seed)."""
    overlap = analysis.mask_overlap(runs, "iid", sparsity, seed)
    pairs = {"RulesOverlapLeastMost": "most_sensitive", "RulesOverlapLeastLowest": "lowest_magnitude",
             "RulesOverlapLeastHighest": "highest_magnitude", "RulesOverlapLeastRandom": "random"}
    for macro, other in pairs.items():
        if "least_sensitive" in overlap.index and other in overlap.columns:
            writer.set(macro, f"{overlap.loc['least_sensitive', other]:.3f}")
    title = f"Mask overlap, sparsity {sparsity:g}, iid, seed {seed} ({writer.profile})"
    if len(overlap):
        writer.figure("mask_overlap", lambda: plots.overlap_heatmap(overlap, title))
    density = analysis.layer_density(runs, "iid", sparsity, seed)
    if len(density):
        writer.figure("layer_density", lambda: plots.layer_density_figure(
            density, f"Trainable fraction per block, sparsity {sparsity:g}, iid, seed {seed} ({writer.profile})"))


SECTIONS = (add_overview, add_constants, add_data, add_lr_search, add_centralized, add_fedavg, add_heterogeneity, add_sparse,
            add_mask_rules)


# =========================================================================== entry points

def generate_report_assets(root: str | Path, report_dir: str | Path, profile: str) -> list[str]:
    """Write every figure, table and numbers.tex of the report from the results under `root`.

    root: <results_dir>/<profile>. Returns the warnings (missing experiments,
    figures that could not be drawn); each has left a visible placeholder.
    """
    writer = ReportWriter(Path(root), Path(report_dir), profile)
    for section in SECTIONS:
        try:
            section(writer)
        except Exception as error:  # partial or odd results: say so, keep going, placeholders follow
            writer.warn(f"{section.__name__} failed ({type(error).__name__}: {error}); "
                        "what it had not written yet is a placeholder")
    writer.finish()
    return writer.warnings


def resolve_report_dir(report_dir: str | Path) -> Path:
    """An absolute report_dir as given; a relative one inside the repository (where main.tex lives)."""
    path = Path(report_dir)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class BuildResult:
    """What latexmk did: success, wall time, page counts and the end of its log."""

    ok: bool
    seconds: float
    pages: int | None
    body_pages: int | None
    log_tail: str


def build_pdf(report_dir: str | Path, timeout: int = 600) -> BuildResult:
    """latexmk -pdf on <report_dir>/main.tex; raises FileNotFoundError when latexmk is not installed."""
    if shutil.which("latexmk") is None:
        raise FileNotFoundError("latexmk is not installed: install TeX Live (e.g. apt-get install latexmk "
                                "texlive-latex-extra texlive-fonts-recommended texlive-bibtex-extra)")
    report_dir = Path(report_dir)
    started = time.perf_counter()
    process = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                             cwd=report_dir, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    tail = "\n".join((process.stdout + process.stderr).splitlines()[-40:])
    return BuildResult(process.returncode == 0, seconds, pdf_pages(report_dir / "main.log"),
                       body_pages(report_dir / "main.aux"), tail)


def pdf_pages(log: Path) -> int | None:
    """Pages of the PDF, from pdflatex's 'Output written on main.pdf (N pages, ...)' line."""
    if not log.is_file():
        return None
    match = re.search(r"Output written on \S+ \((\d+) pages?", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def body_pages(aux: Path, label: str = "LastBodyPage") -> int | None:
    """The page of `label` (placed at the end of the body, before the references), from the .aux file."""
    if not aux.is_file():
        return None
    match = re.search(r"\\newlabel\{" + label + r"\}\{\{[^}]*\}\{(\d+)\}", aux.read_text(errors="replace"))
    return int(match.group(1)) if match else None
