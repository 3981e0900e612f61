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

latex.py formats the numbers and tables and builds the PDF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from . import plots
from .experiments import (CENTRALIZED, FEDAVG_IID, HETEROGENEITY, LR_SEARCH, MASK_RULES, SPARSE_FL,
                          load_experiment)
from .latex import NA, booktabs, latex_escape
from .report_sections import DATA, RULE_KEYS, SCHEDULER_KEYS, SECTIONS, SHARDING_KEYS

REPO_ROOT = Path(__file__).resolve().parent.parent
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
