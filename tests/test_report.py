"""Report assets: numbers.tex, booktabs tables, placeholders, LaTeX escaping, the PDF build.

The unit tests write small run folders by hand (config.json, summary.json,
metrics.csv, as runs.py lays them out) so every expected number is known.
The end-to-end tests use the session's smoke pipeline (tests/smoke_fixture.py).
"""

import json
import re
from pathlib import Path

import papermill
import pytest

from fedta_utils import latex, plots, report
from fedta_utils.experiments import CENTRALIZED, FEDAVG_IID, HETEROGENEITY, LR_SEARCH, SPARSE_FL
from fedta_utils.runs import rows_to_csv

REPO = Path(__file__).resolve().parent.parent
LATEX_COMMANDS = {"Cref", "FloatBarrier", "Phi"}  # capitalised commands of LaTeX and its packages in main.tex
DRIFT = {"mean_client_delta_norm": 1.0, "avg_delta_norm": 0.5, "mean_pairwise_cosine": 0.2,
         "sign_conflict_fraction": 0.3, "sign_agreement": 0.6}


def write_run(root: Path, experiment: str, name: str, config: dict, summary: dict, metrics: list[dict]) -> None:
    run_dir = root / experiment / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.csv").write_bytes(rows_to_csv(metrics))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def write_centralized(root: Path, scheduler: str, accuracies: list[float]) -> None:
    for seed, accuracy in enumerate(accuracies):
        config = {"dataset": "synthetic", "model": "tiny_vit", "seed": seed, "epochs": 2, "batch_size": 64,
                  "lr": 0.1, "weight_decay": 0.0, "scheduler": scheduler, "warmup_epochs": 0.5}
        metrics = [{"epoch": 1, "test_loss": 2.0, "test_acc": accuracy / 2, "val_acc": 0.1},
                   {"epoch": 2, "test_loss": 1.0, "test_acc": accuracy, "val_acc": 0.2}]
        write_run(root, CENTRALIZED, f"{scheduler}-s{seed}", config, {"final_test_acc": accuracy}, metrics)


def write_heterogeneity(root: Path, sharding: str, nc, local_steps: int, accuracies: list[float]) -> None:
    for seed, accuracy in enumerate(accuracies):
        config = {"dataset": "synthetic", "model": "tiny_vit", "seed": seed, "sharding": sharding,
                  "local_steps": local_steps, "rounds": 8 // local_steps, "num_clients": 10, "participation": 0.5}
        if nc is not None:
            config["classes_per_client"] = nc
        metrics = [{"round": r, **DRIFT, "test_acc": accuracy, "test_loss": 1.0} for r in (1, 2)]
        write_run(root, HETEROGENEITY, f"{sharding}{nc}-J{local_steps}-s{seed}", config,
                  {"final_test_acc": accuracy}, metrics)


def write_sparse(root: Path, mask_rule, accuracy: float, seed: int, thresholds=None) -> None:
    finetune = {"head": "train" if mask_rule is None else "ridge", "mask_rule": mask_rule}
    if mask_rule is not None:
        finetune.update(sparsity=0.9, calibration_rounds=2, calibration_samples=100, ridge_lambda=1.0)
    config = {"dataset": "synthetic", "model": "tiny_vit", "seed": seed, "sharding": "iid", "local_steps": 2,
              "rounds": 4, "num_clients": 10, "participation": 0.5, "finetune": finetune}
    summary = {"final_test_acc": accuracy}
    if thresholds is not None:
        summary.update(thresholds=thresholds, achieved_sparsity=0.9)
    metrics = [{"round": 4, **DRIFT, "test_acc": accuracy, "test_loss": 1.0}]
    write_run(root, SPARSE_FL, f"{mask_rule}-s{seed}", config, summary, metrics)


def numbers(report_dir: Path) -> dict:
    frame = report.read_numbers(report_dir / "generated" / "numbers.tex")
    return dict(zip(frame["name"], frame["value"]))


@pytest.fixture
def centralized_root(tmp_path):
    root = tmp_path / "results" / "smoke"
    write_centralized(root, "cosine", [0.80, 0.82, 0.84])
    write_centralized(root, "step", [0.70, 0.72, 0.74])
    return root


# --------------------------------------------------------------------------- numbers.tex

def test_accuracy_macros_hold_mean_and_std_over_seeds(centralized_root, tmp_path):
    report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["CentralizedCosineAcc"] == r"82.0\,$\pm$\,2.0\,\%"
    assert values["CentralizedStepAcc"] == r"72.0\,$\pm$\,2.0\,\%"


def test_seed_count_and_best_scheduler_macros(centralized_root, tmp_path):
    report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["CentralizedSeeds"] == "3"
    assert values["BestScheduler"] == "cosine"
    assert values["SchedulerGap"] == "$+10.0$"


def test_caption_provenance_names_profile_and_seeds(centralized_root, tmp_path):
    report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["ResultsProfile"] == "smoke"
    assert values["CentralizedProvenance"] == "profile smoke, 3 seeds"


def test_heterogeneity_gap_is_iid_minus_the_worst_cell_at_the_same_local_steps(tmp_path):
    root = tmp_path / "results" / "smoke"
    write_heterogeneity(root, "iid", None, 2, [0.5, 0.6])
    write_heterogeneity(root, "iid", None, 4, [0.55, 0.65])
    write_heterogeneity(root, "non_iid", 1, 2, [0.2, 0.3])
    write_heterogeneity(root, "non_iid", 1, 4, [0.1, 0.2])
    report.generate_report_assets(root, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["HeteroWorstSetting"] == "$N_c{=}1$, $J{=}4$"
    assert values["HeteroWorstGap"] == "$+45.0$"
    assert values["HeteroSeeds"] == "2"


def test_threshold_macro_is_the_seed_mean_of_the_last_calibration_round(tmp_path):
    root = tmp_path / "results" / "smoke"
    write_sparse(root, None, 0.50, 0)
    write_sparse(root, "least_sensitive", 0.60, 0, thresholds=[1e-6, 2e-6])
    write_sparse(root, "least_sensitive", 0.70, 1, thresholds=[1e-6, 4e-6])
    report.generate_report_assets(root, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["SparseIidBestThreshold"] == r"$3.00\times10^{-6}$"
    assert values["SparseIidBestGap"] == "$+15.0$"


def test_every_macro_name_is_letters_only():
    assert all(latex.is_macro_name(name) for name in report.MACROS)


def test_every_number_macro_main_tex_uses_is_generated():
    text = (REPO / "report" / "main.tex").read_text()
    used = set(re.findall(r"\\([A-Z][A-Za-z]*)", text)) - LATEX_COMMANDS
    assert used - set(report.MACROS) == set()


# --------------------------------------------------------------------------- tables

def test_tables_are_booktabs_and_hold_the_seed_statistics(centralized_root, tmp_path):
    report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    table = (tmp_path / "report" / "tables" / "centralized.tex").read_text()
    assert "\\toprule" in table and "\\midrule" in table and "\\bottomrule" in table
    assert "cosine & $82.0 \\pm 2.0$ & 3 &" in table


def test_table_cells_from_results_are_latex_escaped(tmp_path):
    root = tmp_path / "results" / "smoke"
    write_centralized(root, "warm_restart", [0.5])
    report.generate_report_assets(root, tmp_path / "report", "smoke")
    assert "warm\\_restart &" in (tmp_path / "report" / "tables" / "centralized.tex").read_text()


def test_latex_escape_escapes_every_special_character():
    assert latex.latex_escape("a_b & 5% #1 {x} $ ~ ^ \\") == (
        r"a\_b \& 5\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{}")


def test_sharding_labels_become_latex():
    assert [latex.sharding_tex(label) for label in ("iid", "Nc=5", "Dir(alpha=0.1)")] == [
        "iid", "$N_c{=}5$", "Dir($\\alpha{=}0.1$)"]


# --------------------------------------------------------------------------- missing results

def test_missing_experiment_gives_a_warning(centralized_root, tmp_path):
    warnings = report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    assert any(FEDAVG_IID in message for message in warnings)
    assert not any(CENTRALIZED in message for message in warnings)


def test_missing_experiment_gives_placeholder_table_figure_and_macros(centralized_root, tmp_path):
    report.generate_report_assets(centralized_root, tmp_path / "report", "smoke")
    table = (tmp_path / "report" / "tables" / "fedavg.tex").read_text()
    assert "No results yet for 02\\_fedavg\\_iid (profile smoke)" in table and "\\toprule" in table
    assert (tmp_path / "report" / "figures" / "fedavg_vs_central.pdf").is_file()
    values = numbers(tmp_path / "report")
    assert values["FedAvgIidAcc"] == latex.NA
    assert values["FedAvgProvenance"] == "profile smoke, no results yet"


def test_empty_results_root_writes_every_asset_without_raising(tmp_path):
    warnings = report.generate_report_assets(tmp_path / "nothing" / "smoke", tmp_path / "report", "smoke")
    assert len(warnings) >= 7
    assert all((tmp_path / "report" / "figures" / f"{stem}.pdf").is_file() for stem in report.FIGURES)
    assert all((tmp_path / "report" / "figures" / f"{stem}.png").is_file() for stem in report.FIGURES)
    assert all((tmp_path / "report" / "tables" / f"{stem}.tex").is_file() for stem in report.TABLES)
    assert set(numbers(tmp_path / "report")) == set(report.MACROS)


def test_a_figure_that_fails_becomes_a_placeholder_and_a_warning(tmp_path, monkeypatch):
    root = tmp_path / "results" / "smoke"
    config = {"dataset": "synthetic", "model": "tiny_vit", "seed": 0, "epochs": 1, "lr": 0.1, "weight_decay": 0.0}
    write_run(root, LR_SEARCH, "search", config, {"final_val_acc": 0.3}, [{"epoch": 1, "val_acc": 0.3}])

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(plots, "lr_search_figure", broken)
    warnings = report.generate_report_assets(root, tmp_path / "report", "smoke")
    assert any("lr_search" in message and "cannot draw" in message for message in warnings)
    assert (tmp_path / "report" / "figures" / "lr_search.pdf").is_file()
    assert numbers(tmp_path / "report")["ChosenLr"] == "0.1"


# --------------------------------------------------------------------------- reading the build

def test_pdf_pages_reads_the_latex_log(tmp_path):
    (tmp_path / "main.log").write_text("...\nOutput written on main.pdf (9 pages, 285121 bytes).\n")
    assert latex.pdf_pages(tmp_path / "main.log") == 9


def test_body_pages_reads_the_label_page_from_the_aux_file(tmp_path):
    (tmp_path / "main.aux").write_text("\\newlabel{LastBodyPage}{{5}{8}{Conclusion}{section.5}{}}\n")
    assert latex.body_pages(tmp_path / "main.aux") == 8


def test_notebook_06_declares_the_parameters_the_pipeline_passes():
    declared = papermill.inspect_notebook(str(REPO / "notebooks" / "06_report_figures.ipynb"))
    assert {"profile", "results_dir", "drive_dir", "report_dir", "build_pdf"} <= set(declared)


# --------------------------------------------------------------------------- end to end (smoke pipeline)

@pytest.mark.slow
def test_smoke_pipeline_builds_the_report_pdf(smoke_results):
    report_dir = smoke_results["report_dir"]
    assert (report_dir / "main.pdf").is_file()
    assert latex.pdf_pages(report_dir / "main.log") >= 1


@pytest.mark.slow
def test_smoke_report_body_fits_the_page_limit(smoke_results):
    pages = latex.body_pages(smoke_results["report_dir"] / "main.aux")
    assert pages is not None and pages <= latex.BODY_PAGE_LIMIT


@pytest.mark.slow
def test_smoke_numbers_say_they_come_from_the_smoke_profile(smoke_results):
    assert numbers(smoke_results["report_dir"])["ResultsProfile"] == "smoke"


@pytest.mark.slow
def test_smoke_pipeline_fills_every_number_and_table(smoke_results):
    report_dir = smoke_results["report_dir"]
    missing = [name for name, value in numbers(report_dir).items() if value == latex.NA]
    tables = {stem: (report_dir / "tables" / f"{stem}.tex").read_text() for stem in report.TABLES}
    placeholders = [stem for stem, text in tables.items() if "No results yet" in text]
    assert missing == [] and placeholders == []
