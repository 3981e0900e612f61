"""Results -> tables, figures, numbers.tex and the PDF (fedta_utils.figures, fedta_utils.report).

The unit tests write small run folders by hand (config.json, summary.json, metrics.csv and, for the
mask rules, prepared.pt, as the runs lay them out), so every expected number is known. In them the
configuration that is best on validation is never the one that is best on test, so a "best" chosen
on test would fail. The end-to-end tests use the session's smoke pipeline (tests/smoke_fixture.py).
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest
import torch
from conftest import needs_tex

from fedta_utils import figures, report, results, runs
from fedta_utils.experiments import (
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
)
from fedta_utils.runs import rows_to_csv

REPO = Path(__file__).resolve().parent.parent
LATEX_COMMANDS = {"Cref", "FloatBarrier", "Phi"}  # capitalised commands of LaTeX and its packages in main.tex
DRIFT = {
    "mean_client_delta_norm": 1.0,
    "avg_delta_norm": 0.5,
    "mean_pairwise_cosine": 0.2,
    "sign_conflict_fraction": 0.3,
    "sign_agreement": 0.6,
}
FL = {"dataset": "synthetic", "model": "tiny_vit", "num_clients": 10, "participation": 0.5, "batch_size": 64}
ROUND_IMAGES = 5 * 64  # per local step of a round: m = 0.5 * 10 clients, B = 64
TRAIN_IMAGES = 900  # the train split of write_study: a centralized epoch
# Per-block masks of two rules (block 0: 4 entries, block 1: 4 entries, patch embedding: 2 entries).
MASKS = {
    "least_sensitive": {
        "blocks.0.attn.qkv.weight": [1, 1, 1, 1],
        "blocks.1.mlp.fc1.weight": [0, 0, 0, 0],
        "patch_embed.proj.weight": [1, 0],
    },
    "random": {
        "blocks.0.attn.qkv.weight": [1, 1, 0, 0],
        "blocks.1.mlp.fc1.weight": [1, 1, 0, 0],
        "patch_embed.proj.weight": [1, 1],
    },
}


def add_to_grid(root, experiment, folder, part="runs") -> None:
    """Name the run <root>/runs/<folder> in the experiment's recorded grid (or among its earlier runs)."""
    grid = runs.read_grid(root, experiment) or {"params": {}, "runs": [], "earlier": []}
    grid[part].append(folder)
    runs.grid_path(root, experiment).parent.mkdir(parents=True, exist_ok=True)
    runs.grid_path(root, experiment).write_text(json.dumps(grid))


def write_run(root, experiment, name, config, summary, metrics, masks=None, part="runs") -> None:
    """A complete run in the store, named in the experiment's grid (`part` "earlier": left out of it)."""
    run_dir = Path(root) / runs.RUNS_DIR / f"{experiment}-{name}"
    run_dir.mkdir(parents=True)
    add_to_grid(root, experiment, run_dir.name, part)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.csv").write_bytes(rows_to_csv(metrics))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if masks is not None:  # as the runs store them: bit-packed, one entry per parameter
        packed = {
            name: {"shape": [len(bits)], "bits": torch.from_numpy(np.packbits(np.array(bits, bool)))}
            for name, bits in masks.items()
        }
        torch.save({"masks": packed}, run_dir / "prepared.pt")


def write_centralized(root, scheduler, val, test, lr=0.1, part="runs", full=True) -> None:
    """A scheduler's runs, a seed per (val, test) pair; `full`: evaluated on the full validation split
    at every point. Validation reaches 99 % of its final value at epoch 1, test only at epoch 2."""
    for seed, (v, t) in enumerate(zip(val, test)):
        config = {
            "dataset": "synthetic",
            "model": "tiny_vit",
            "seed": seed,
            "epochs": 2,
            "batch_size": 64,
            "lr": lr,
            "weight_decay": 0.0,
            "scheduler": scheduler,
            "warmup_epochs": 0.5,
            "finetune": {"head": "train", "mask_rule": None},
            **({"full_val_curve": True} if full else {}),  # config.json has it only where True
        }
        metrics = [
            {"epoch": e, "samples": TRAIN_IMAGES, "val_loss": 1 / e, "test_loss": 2 / e, **acc}
            for e, acc in ((1, {"test_acc": t / 2, "val_acc": 0.995 * v}), (2, {"test_acc": t, "val_acc": v}))
        ]
        write_run(
            root,
            CENTRALIZED,
            f"{scheduler}-lr{lr}-s{seed}",
            config,
            {"final_val_acc": v, "final_test_acc": t, "trained_images": 2 * TRAIN_IMAGES},
            metrics,
            part=part,
        )


def write_fl(
    root,
    experiment,
    name,
    seed,
    val,
    test,
    rounds=4,
    local_steps=2,
    nc=None,
    finetune=None,
    summary=(),
    masks=None,
    full=False,
    **fields,
) -> None:
    """A FedAvg run whose accuracies grow linearly to `val` and `test`; `full`: evaluated on the full
    validation split at every round; `fields`: more of its config (a remedy's algorithm, merge rule)."""
    config = {
        **FL,
        "seed": seed,
        "rounds": rounds,
        "local_steps": local_steps,
        "sharding": "iid" if nc is None else "non_iid",
        "finetune": finetune or {"head": "train", "mask_rule": None},
        **fields,
    }
    if nc is not None:
        config["classes_per_client"] = nc
    if full:
        config["full_val_curve"] = True
    samples = ROUND_IMAGES * local_steps
    metrics = [
        {"round": r, "samples": samples, **DRIFT, "val_loss": 1 / r, "val_acc": val * r / rounds}
        | {"test_loss": 1.0, "test_acc": test * r / rounds}
        for r in range(1, rounds + 1)
    ]
    summary = {
        "final_val_acc": val,
        "final_test_acc": test,
        "trained_images": rounds * samples,
        **dict(summary),
    }
    write_run(root, experiment, f"{name}-s{seed}", config, summary, metrics, masks)


def sparse_spec(sparsity, rounds=2, rule="least_sensitive") -> dict:
    return {
        "head": "ridge",
        "mask_rule": rule,
        "sparsity": sparsity,
        "calibration_rounds": rounds,
        "calibration_samples": 100,
        "ridge_lambda": 1.0,
    }


def write_study(root) -> None:
    """Every experiment; wherever configurations compete, the validation best is not the test best."""
    data = Path(root) / results.DATA
    data.mkdir(parents=True)
    (data / "split_sizes.csv").write_text("split,images\ntrain,900\nvalidation,100\ntest,500\n")
    (data / "shard_stats.csv").write_text(
        "client,samples,classes,largest_class_share,scheme\n"
        "0,90,10,0.1,iid\n1,90,10,0.1,iid\n"
        "0,80,5,0.3,Nc=5\n1,100,5,0.2,Nc=5\n"
    )
    # Notebook 01's grid under every scheduler: cosine chooses lr 0.1, step lr 0.01.
    for scheduler, lr, val in (
        ("cosine", 0.01, 0.30),
        ("cosine", 0.1, 0.40),
        ("step", 0.01, 0.45),
        ("step", 0.1, 0.35),
    ):
        write_run(
            root,
            LR_SEARCH,
            f"search-{scheduler}-lr{lr}",
            {"seed": 0, "epochs": 1, "lr": lr, "weight_decay": 0.0, "scheduler": scheduler},
            {"final_val_acc": val},
            [{"epoch": 1, "val_acc": val}],
        )
    for lr, val in ((0.01, 0.45), (0.03, 0.35)):
        write_run(
            root,
            FEDAVG_LR_SEARCH,
            f"search-lr{lr}",
            {**FL, "seed": 0, "rounds": 3, "lr": lr, "weight_decay": 0.0},
            {"final_val_acc": val},
            [{"round": 3, "val_acc": val}],
        )
    for lr, val in ((0.003, 0.42), (0.01, 0.38)):  # notebook 04's lr search under the frozen head
        write_run(
            root,
            SPARSE_LR_SEARCH,
            f"search-lr{lr}",
            {**FL, "seed": 0, "rounds": 3, "lr": lr, "weight_decay": 0.0, "finetune": sparse_spec(0.9)},
            {"final_val_acc": val},
            [{"round": 3, "val_acc": val}],
        )
    (Path(root) / "hparams.json").write_text(
        json.dumps(
            {
                "scheduler_search": {
                    "cosine": {"lr": 0.1, "weight_decay": 0.0, "val_acc": 0.40},
                    "step": {"lr": 0.01, "weight_decay": 0.0, "val_acc": 0.45},
                },
                "central_scheduler": "cosine",
                "central_lr": 0.1,
                "central_weight_decay": 0.0,
                "fedavg_lr": 0.01,
                "fedavg_weight_decay": 0.0,
                "sparse_lr": 0.003,
                "sparse_central_lr": 0.03,
            }
        )
    )
    write_centralized(root, "cosine", val=[0.60, 0.62, 0.64], test=[0.80, 0.82, 0.84])
    write_centralized(root, "step", val=[0.50, 0.52, 0.54], test=[0.90, 0.92, 0.94], lr=0.01)
    write_centralized(root, "cosine", val=[0.99], test=[0.99], lr=0.01, part="earlier")  # an earlier grid's
    for seed in (0, 1):
        write_fl(root, FEDAVG_IID, "iid", seed, 0.5, 0.6 + 0.02 * seed, full=True)
        add_to_grid(root, HETEROGENEITY, f"{FEDAVG_IID}-iid-s{seed}")  # iid at J=2: notebook 02's very runs
        for nc, local_steps, acc in ((None, 4, 0.55), (1, 2, 0.2), (5, 2, 0.4)):
            write_fl(
                root, HETEROGENEITY, f"{nc}-J{local_steps}", seed, acc, acc, local_steps=local_steps, nc=nc
            )
        for nc in (None, 5):
            tag = "iid" if nc is None else "nc5"
            write_fl(root, SPARSE_FL, f"{tag}-dense", seed, 0.50, 0.50, nc=nc)
            write_fl(
                root,
                HEAD_ONLY,
                f"{tag}-head",
                seed,
                0.30,
                0.30,
                rounds=1,
                nc=nc,
                finetune={"head": "ridge", "mask_rule": None},
                summary={"trained_images": 0},  # the head alone trains nothing
            )
            for sparsity, val, test, clip in ((0.9, 0.70, 0.55, 0.1), (0.99, 0.60, 0.65, 0.05)):
                write_fl(
                    root,
                    SPARSE_FL,
                    f"{tag}-{sparsity}",
                    seed,
                    val,
                    test,
                    nc=nc,
                    finetune=sparse_spec(sparsity),
                    summary={
                        "thresholds": [1e-6, 2e-6 * (seed + 1)],
                        "achieved_sparsity": sparsity,
                        "clip_fraction": clip * (seed + 1),
                    },
                )
            for rule, val, test in (("least_sensitive", 0.40, 0.70), ("random", 0.60, 0.50)):
                write_fl(
                    root,
                    MASK_RULES,
                    f"{tag}-{rule}",
                    seed,
                    val,
                    test,
                    nc=nc,
                    finetune=sparse_spec(0.9, 2, rule),
                    masks=MASKS[rule],
                )
    write_remedies(root)
    config = {
        "dataset": "synthetic",
        "model": "tiny_vit",
        "seed": 0,
        "epochs": 1,
        "lr": 0.03,  # its own, searched under the frozen head
        "weight_decay": 0.0,
        "scheduler": "cosine",  # notebook 01's choice
        "finetune": sparse_spec(0.9, 4),
    }
    write_run(
        root,
        SPARSE_CENTRAL,
        "sparse-central",
        config,
        {"final_val_acc": 0.6, "final_test_acc": 0.7, "trained_images": TRAIN_IMAGES, "clip_fraction": 0.4},
        [{"epoch": 1, "samples": TRAIN_IMAGES, "test_acc": 0.7, "val_acc": 0.6, "clip_fraction": 0.4}],
    )


# Notebook 06's methods: (config fields, final validation and test accuracy on non-iid shards). TIES is best
# on validation, FedProx on test; FedAvgM is FedAvg's best server step on validation, FedAvg on test.
REMEDY_RUNS = {
    "fedavg": ({}, 0.40, 0.45),
    "fedavgm": ({"server_lr": 0.5, "server_momentum": 0.9}, 0.42, 0.41),
    "fedprox": ({"algorithm": "fedprox", "prox_mu": 0.01}, 0.41, 0.60),
    "ties": ({"merge_rule": "ties", "ties_density": 0.2, "server_lr": 1.0}, 0.50, 0.47),
    "fisher": ({"merge_rule": "fisher"}, 0.30, 0.35),
    "sparse": ({"finetune": sparse_spec(0.9)}, 0.35, 0.36),
    "scaffold": ({"algorithm": "scaffold", "finetune": sparse_spec(0.9)}, 0.36, 0.37),
}


def write_remedies(root) -> None:
    """Notebook 06: its three searches on Nc=5 (the first setting of each best) and its grid, two seeds:
    every method on Nc=5 and Nc=1, FedAvg and sparse FedAvg on iid shards."""
    for experiment, settings in (
        (
            FEDAVGM_SEARCH,
            [{"server_lr": 0.5, "server_momentum": 0.9}, {"server_lr": 1.0, "server_momentum": 0.5}],
        ),
        (
            FEDPROX_SEARCH,
            [{"algorithm": "fedprox", "prox_mu": 0.01}, {"algorithm": "fedprox", "prox_mu": 0.1}],
        ),
        (TIES_SEARCH, [{"merge_rule": "ties", "ties_density": 0.2, "server_lr": 1.0}]),
    ):
        for i, fields in enumerate(settings):
            write_fl(root, experiment, f"search{i}", 0, 0.5 - 0.1 * i, 0.5, rounds=2, nc=5, **fields)
    for seed in (0, 1):
        for nc in (None, 5, 1):
            for method, (fields, val, test) in REMEDY_RUNS.items():
                if nc is None and method not in ("fedavg", "sparse"):
                    continue
                summary = {"trainable_entries": 1000} if "finetune" in fields else {}
                write_fl(root, REMEDIES, f"{nc}-{method}", seed, val, test, nc=nc, summary=summary, **fields)


def numbers(report_dir) -> dict:
    return report.read_numbers(Path(report_dir) / "generated" / "numbers.tex")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every experiment written by hand, and the report built from it once: (root, report_dir, warnings)."""
    base = tmp_path_factory.mktemp("study")
    root = base / "results" / "smoke"
    write_study(root)
    warnings = report.write_report(root, base / "report", "smoke")
    return root, base / "report", warnings


@pytest.fixture(scope="module")
def centralized_only(tmp_path_factory):
    """Only notebook 01's scheduler runs, and the report built from them: (report_dir, warnings)."""
    base = tmp_path_factory.mktemp("partial")
    write_centralized(base / "smoke", "cosine", val=[0.6, 0.6, 0.6], test=[0.80, 0.82, 0.84])
    write_centralized(base / "smoke", "warm_restart", val=[0.1], test=[0.1], full=False)
    return base / "report", report.write_report(base / "smoke", base / "report", "smoke")


# --------------------------------------------------------------------------- statistics and selection


def test_mean_std_uses_ddof_1_and_gives_0_for_one_seed(study):
    table = results.centralized_table(study[0])
    cosine = table.set_index("scheduler").loc["cosine"]
    assert cosine["mean"] == pytest.approx(0.82) and cosine["std"] == pytest.approx(0.02) and cosine["n"] == 3
    single = results.mean_std(results.load_runs(study[0], LR_SEARCH), ["scheduler", "lr"])
    assert list(single["std"]) == [0.0] * 4


def test_the_best_scheduler_is_chosen_on_validation_and_reported_on_test(study):
    values = numbers(study[1])
    assert values["BestScheduler"] == "cosine"  # step has the higher test accuracy, cosine the higher val
    assert values["CentralizedBestAcc"] == r"82.0\,$\pm$\,2.0\,\%"


def test_the_best_sparse_setting_is_chosen_on_validation_with_its_gap_to_fedavg(study):
    table = results.sparse_table(study[0])
    chosen = table[table["chosen"]]
    assert list(chosen["sparsity"]) == [0.9, 0.9] and list(chosen["sharding_label"]) == ["iid", "Nc=5"]
    values = numbers(study[1])
    assert values["SparseIidBestAcc"] == r"55.0\,$\pm$\,0.0\,\%" and values["SparseIidBestGap"] == "$+5.0$"
    assert values["SparseNonIidBestAcc"] == r"55.0\,$\pm$\,0.0\,\%"


def test_the_best_mask_rule_is_chosen_on_validation(study):
    values = numbers(study[1])
    assert values["RulesIidBestRule"] == "random" and values["RulesNonIidBestRule"] == "random"
    assert values["RulesIidBestAcc"] == r"50.0\,$\pm$\,0.0\,\%"


def test_each_remedy_is_labelled_by_what_it_changes_in_fedavg(study):
    table = results.remedy_table(study[0])
    assert table["method"].unique().tolist() == [
        "FedAvg",
        "sparse",
        "FedAvgM",
        "FedProx",
        "TIES",
        "Fisher merge",
        "SCAFFOLD (sparse)",
    ]
    assert table.groupby("sharding_label", sort=False).size().to_dict() == {"iid": 2, "Nc=1": 7, "Nc=5": 7}
    assert (
        set(table["n"]) == {2} and table["sign_conflict_fraction"].eq(DRIFT["sign_conflict_fraction"]).all()
    )


def test_the_best_remedy_is_chosen_on_validation_against_fedavg_at_its_best_server_step(study):
    table = results.remedy_table(study[0])
    assert table.loc[table["chosen"], "method"].tolist() == ["FedAvg", "TIES", "TIES"]  # iid, Nc=1, Nc=5
    best = numbers(study[1])["RemedyBest"]
    # TIES 47 % against FedAvgM's 41 % (FedAvgM is better than FedAvg on validation, not on test)
    assert best.startswith("TIES on $N_c{=}1$ (47.0") and "+6.0 points over FedAvgM" in best
    assert "FedProx" not in best  # best on test, not on validation


def test_the_remedy_searches_choose_on_validation_and_the_report_names_the_values_used(study):
    table = results.search_table(study[0], FEDAVGM_SEARCH)
    assert table[["server_lr", "server_momentum", "chosen"]].values.tolist() == [
        [0.5, 0.9, True],
        [1.0, 0.5, False],
    ]
    values = numbers(study[1])
    assert (
        values["RemedyChosen"]
        == r"FedAvgM $\eta_s{=}0.5$, $\beta{=}0.9$; FedProx $\mu{=}0.01$; TIES $p{=}0.2$, $\lambda{=}1$"
    )
    assert values["RemedyScaffoldState"] == "0.00\\,GB"  # 4 bytes x 1,000 entries x (10 clients + 1)


def test_the_learning_rate_search_chooses_a_pair_per_scheduler_on_validation(study):
    table = results.lr_search_table(study[0])
    assert table.loc[table["chosen"], ["scheduler", "lr"]].values.tolist() == [
        ["cosine", 0.1],
        ["step", 0.01],
    ]
    values = numbers(study[1])
    assert values["ChosenLr"] == "0.1"  # the best scheduler's (cosine's) own choice
    assert r"under each scheduler (cosine, step)" in values["SearchGrid"]


def test_the_scheduler_table_compares_each_scheduler_at_its_own_learning_rate(study):
    table = results.centralized_table(study[0]).set_index("scheduler")
    assert table["lr"].to_dict() == {"cosine": 0.1, "step": 0.01}
    assert "step & 0.01, 0 & 52.0" in (study[1] / "tables" / "centralized.tex").read_text()


def test_the_lr_search_figure_has_a_panel_per_scheduler(study):
    fig = figures.lr_search_heatmap(study[0], "smoke")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["cosine", "step"]


def test_ties_on_validation_go_to_the_first_configuration_in_table_order():
    table = results.choose(pd.DataFrame({"lr": [0.01, 0.1], "val": [0.5, 0.5]}))
    assert list(table["chosen"]) == [True, False]


def test_scheduler_runs_at_other_learning_rates_are_left_out(study):
    assert results.centralized_table(study[0]).set_index("scheduler").loc["cosine", "n"] == 3


def test_epochs_to_99_percent_is_read_from_the_full_validation_curve_not_test(study):
    # Validation reaches 99 % of its final value at epoch 1, the test curve (subset points) at epoch 2.
    assert list(results.centralized_table(study[0])["epochs_to_99"]) == [1, 1]


def test_a_scheduler_without_a_full_validation_curve_has_no_epochs_to_99(centralized_only):
    table = results.centralized_table(centralized_only[0].parent / "smoke").set_index("scheduler")
    assert table.loc["cosine", "epochs_to_99"] == 1 and np.isnan(table.loc["warm_restart", "epochs_to_99"])
    assert (
        "warm\\_restart & 0.1, 0 & 10.0 & $10.0 \\pm 0.0$ & 1 & -- \\\\"
        in (centralized_only[0] / "tables" / "centralized.tex").read_text()
    )


def test_fedavg_and_centralized_are_compared_at_the_images_both_processed(study):
    table = results.fedavg_table(study[0]).set_index("method")
    # FedAvg: a round is m=5 clients x J=2 steps x B=64 images = 640, 4 rounds 2,560; centralized: 2 x 900.
    assert table["budget"].tolist() == [1800, 1800]
    assert table.loc["centralized (cosine)", "val_at_budget"] == pytest.approx(0.62)
    # FedAvg's seed-mean validation accuracy grows linearly to 0.5 at 2,560 images: interpolated at 1,800.
    assert table.loc["FedAvg (iid)", "val_at_budget"] == pytest.approx(0.5 * 1800 / 2560)


def test_the_late_round_gain_is_read_from_the_full_validation_curve(study):
    # Seed-mean validation accuracy 0.375 at round 3 (the last at or before 80 % of 4 rounds), 0.5 at 4.
    gain = results.late_gain(study[0])
    assert "+12.50 points from round 3 to 4" in gain and "not what more rounds would reach" in gain
    assert "evaluation subset" not in gain


def test_runs_without_a_full_validation_curve_give_no_curve_numbers(tmp_path):
    for seed in (0, 1):
        write_fl(tmp_path, FEDAVG_IID, "iid", seed, 0.5, 0.6)  # subset points, then the full split
    assert "no late-round gain" in results.late_gain(tmp_path) and "points from" not in results.late_gain(
        tmp_path
    )
    assert results.fedavg_table(tmp_path)["val_at_budget"].isna().all()
    with pytest.raises(results.NoResults, match="full validation split"):
        results.sample_curves(tmp_path)


def test_every_comparison_table_states_the_images_each_method_trained_on(study):
    root = study[0]
    assert results.fedavg_table(root)["trained_images"].tolist() == [1800, 2560]
    assert results.heterogeneity_table(root)["trained_images"].tolist() == [2560, 5120, 2560, 2560]
    sparse = results.sparse_table(root).set_index(["sharding_label", "method", "sparsity"])["trained_images"]
    assert sparse[("iid", "sparse", 0.9)] == 2560 and sparse[("iid", "head only", np.nan)].item() == 0
    assert results.sparse_central_table(root)["trained_images"].tolist() == [900]
    assert set(results.rules_table(root)["trained_images"]) == {2560}
    tables = study[1] / "tables"
    assert (
        "images (k)" in (tables / "fedavg.tex").read_text()
        and "& 2.56 &" in (tables / "fedavg.tex").read_text()
    )
    assert "images (k)" in (tables / "mask_rules.tex").read_text()
    assert "centralized sparse 0.9, $R{=}4$ & -- & 0.9 & 40.0 &" in (tables / "sparse.tex").read_text()


def test_the_sparse_table_shows_the_share_of_steps_the_clip_scaled_down(study):
    table = results.sparse_table(study[0])
    # seed 0 clips 10 % of its steps at sparsity 0.9, seed 1 20 %: the seed mean.
    assert table.loc[table["chosen"], "clip_fraction"].tolist() == pytest.approx([0.15, 0.15])
    text = (study[1] / "tables" / "sparse.tex").read_text()
    assert (
        "clipped (\\%)" in text and "sparse 0.9, $R{=}2$ & iid & 2.56 & 15.0 & $55.0 \\pm 0.0^\\star$" in text
    )


def test_the_centralized_sparse_baseline_reports_its_own_lr_and_01s_scheduler(study):
    values = numbers(study[1])
    assert (values["SparseCentralLr"], values["SparseCentralScheduler"]) == ("0.03", "cosine")


def test_sharding_labels_order_iid_first_then_by_classes_per_client(study):
    assert list(results.heterogeneity_table(study[0])["sharding_label"].unique()) == ["iid", "Nc=1", "Nc=5"]


def test_drift_table_averages_the_diagnostics_over_rounds(study):
    drift = results.drift_table(study[0])
    assert drift["mean_pairwise_cosine"].tolist() == pytest.approx([0.2] * len(drift))
    assert drift["update_efficiency"].tolist() == pytest.approx([0.5] * len(drift))


def test_the_threshold_is_the_seed_mean_of_the_last_calibration_round(study):
    table = results.sparse_table(study[0])
    assert table.loc[table["chosen"], "threshold"].tolist() == pytest.approx([3e-6, 3e-6])


def test_mask_overlap_is_the_jaccard_index_of_the_trainable_sets(study):
    overlap = results.mask_overlap_table(study[0])
    # least: {b0: 4, p: 1} = 5 entries; random: {b0: 2, b1: 2, p: 2} = 6; shared: b0 2 + p 1 = 3.
    assert overlap.loc["least_sensitive", "random"] == pytest.approx(3 / 8)
    assert overlap.loc["random", "random"] == 1.0


def test_block_density_is_the_trainable_fraction_per_transformer_block(study):
    density = results.block_density_table(study[0]).set_index(["rule", "block"])["density"]
    assert density[("least_sensitive", 0)] == 1.0 and density[("least_sensitive", 1)] == 0.0
    assert density[("least_sensitive", -1)] == 0.5 and density[("random", 1)] == 0.5


# --------------------------------------------------------------------------- numbers.tex


def test_numbers_tex_defines_every_macro_once_and_parses_back(study):
    text = (study[1] / "generated" / "numbers.tex").read_text()
    names = re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", text)
    assert sorted(names) == sorted(report.MACROS) and len(names) == len(set(names))
    assert set(numbers(study[1])) == set(report.MACROS)


def test_the_client_searches_report_their_validation_choices(study):
    values = numbers(study[1])
    assert (values["FedAvgChosenLr"], values["SparseChosenLr"]) == ("0.01", "0.003")
    assert values["SparseSearchGrid"].startswith(
        r"client learning rates \{0.003, 0.01\} at 02's weight decay"
    )
    assert "ridge penalty 1 (fixed)" in values["SparseSetting"]  # the study's heads fix the penalty at 1.0


def test_the_report_names_the_values_the_runs_used_when_a_notebook_set_its_own(study):
    """hparams.json: the search's choice and the value used; a notebook that set lr by hand trained at it."""
    hparams = study[0] / "hparams.json"
    stored = json.loads(hparams.read_text())
    try:
        hparams.write_text(json.dumps({**stored, "fedavg_lr": 0.2, "sparse_lr": 0.05, "central_lr": 0.3}))
        assert report.used(study[0], "fedavg_lr", 0.01) == 0.2
        assert report.used(study[0], "no_such_key", 0.01) == 0.01  # nothing recorded: the search's choice
        values = report._client_searches(study[0], "smoke") | report._centralized(study[0], "smoke")
        assert (values["FedAvgChosenLr"], values["SparseChosenLr"], values["ChosenLr"]) == (
            "0.2",
            "0.05",
            "0.3",
        )
    finally:
        hparams.write_text(json.dumps(stored))


def test_a_complete_study_fills_every_macro_without_warnings(study):
    assert [name for name, value in numbers(study[1]).items() if value == report.NA] == []
    assert study[2] == []


def test_every_macro_name_is_letters_only():
    assert all(re.fullmatch(r"[A-Za-z]+", name) for name in report.MACROS)


def test_main_tex_uses_exactly_the_macros_numbers_tex_defines():
    text = (REPO / "report" / "main.tex").read_text()
    assert set(re.findall(r"\\([A-Z][A-Za-z]*)", text)) - LATEX_COMMANDS == set(report.MACROS)


def test_caption_provenance_names_profile_and_seeds(study):
    values = numbers(study[1])
    assert values["ResultsProfile"] == "smoke" and values["CentralizedProvenance"] == "profile smoke, 3 seeds"
    assert values["SearchProvenance"] == "profile smoke, 1 seed"


def test_a_non_full_build_opens_with_a_notice(study):
    assert "Not results: a smoke build" in numbers(study[1])["ResultsNotice"]


def test_a_full_build_has_no_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "FIGURES", {})  # numbers only
    report.write_report(tmp_path / "nothing", tmp_path / "report", "full")
    assert numbers(tmp_path / "report")["ResultsNotice"] == ""


# --------------------------------------------------------------------------- tables and figures


def test_tables_are_booktabs_and_mark_the_configuration_chosen_on_validation(study):
    table = (study[1] / "tables" / "centralized.tex").read_text()
    assert table.startswith("\\begin{tabular}{lrrrrr}\n\\toprule") and "\\midrule" in table
    assert "\\bottomrule\n\\end{tabular}" in table
    assert "cosine & 0.1, 0 & 62.0 & $82.0 \\pm 2.0^\\star$ & 3 & 1 \\\\" in table
    assert "step & 0.01, 0 & 52.0 & $92.0 \\pm 2.0$ & 3 & 1 \\\\" in table


def test_table_cells_from_results_are_latex_escaped(centralized_only):
    assert "warm\\_restart &" in (centralized_only[0] / "tables" / "centralized.tex").read_text()


def test_latex_escape_escapes_every_special_character():
    assert report.escape("a_b & 5% #1 {x} $ ~ ^ \\") == (
        r"a\_b \& 5\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{}"
    )


def test_sharding_labels_become_latex():
    assert [report.sharding_tex(label) for label in ("iid", "Nc=5", "Dir(alpha=0.1)", "Dir(0.1)")] == [
        "iid",
        "$N_c{=}5$",
        "Dir($\\alpha{=}0.1$)",
        "Dir($\\alpha{=}0.1$)",
    ]


def test_figures_are_saved_as_pdf_with_embedded_truetype_fonts_and_png(study):
    assert b"/FontFile2" in (study[1] / "figures" / "heterogeneity_heatmap.pdf").read_bytes()
    assert all((study[1] / "figures" / f"{name}.png").is_file() for name in report.FIGURES)


def test_figures_have_their_declared_size(study):
    fig = figures.heterogeneity_heatmap(study[0], "smoke")
    assert tuple(fig.get_size_inches()) == pytest.approx((figures.COLUMN, figures.COLUMN * 0.8))


def test_figure_titles_name_the_profile_and_the_seed_count(study):
    fig = figures.drift_figure(study[0], "smoke")
    assert fig.get_suptitle() == "Client drift and interference (profile smoke, 2 seeds)"


# --------------------------------------------------------------------------- missing results


def test_a_missing_experiment_gives_a_warning_naming_it(centralized_only):
    warnings = centralized_only[1]
    assert any(FEDAVG_IID in message for message in warnings)
    assert not any(CENTRALIZED in message for message in warnings)


def test_a_missing_experiment_gives_placeholder_table_figure_and_na_macros(centralized_only):
    report_dir = centralized_only[0]
    table = (report_dir / "tables" / "fedavg.tex").read_text()
    assert "No results yet for fedavg (profile smoke)" in table and "\\toprule" in table
    assert (report_dir / "figures" / "fedavg_vs_central.pdf").is_file()
    values = numbers(report_dir)
    assert values["FedAvgIidAcc"] == report.NA
    assert values["FedAvgProvenance"] == "profile smoke, no results yet"
    assert values["BestScheduler"] == "cosine"  # the experiment that ran is still reported


def test_a_sharding_without_sparse_runs_leaves_only_its_own_macros_na(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "FIGURES", {})  # numbers only
    write_fl(tmp_path, SPARSE_FL, "iid-dense", 0, 0.5, 0.5)
    write_fl(tmp_path, SPARSE_FL, "iid-sparse", 0, 0.6, 0.6, finetune=sparse_spec(0.9))
    for nc in (None, 5):  # the head alone ran on both shardings, sparse FedAvg only on iid so far
        write_fl(
            tmp_path,
            HEAD_ONLY,
            f"{nc}-head",
            0,
            0.3,
            0.3,
            rounds=1,
            nc=nc,
            finetune={"head": "ridge", "mask_rule": None},
        )
    warnings = report.write_report(tmp_path, tmp_path / "report", "smoke")
    values = numbers(tmp_path / "report")
    assert values["SparseIidBestAcc"] == r"60.0\,$\pm$\,0.0\,\%" and values["SparseIidBestGap"] == "$+10.0$"
    assert values["SparseNonIidBestAcc"] == report.NA
    assert not any("failed" in message for message in warnings)


def test_a_figure_without_results_is_a_placeholder_of_its_size(tmp_path):
    fig = figures.sparsity_figure(tmp_path, "smoke")
    width, aspect = figures.sparsity_figure.size
    assert tuple(fig.get_size_inches()) == pytest.approx((width, width * aspect))
    assert "no results yet (profile smoke)" in fig.axes[0].texts[0].get_text()


def test_a_table_without_results_raises_no_results(tmp_path):
    with pytest.raises(results.NoResults, match=HETEROGENEITY):
        results.heterogeneity_table(tmp_path)


def test_an_empty_results_root_writes_every_asset_without_raising(tmp_path):
    warnings = report.write_report(tmp_path / "nothing", tmp_path / "report", "smoke")
    assert len(warnings) == len(report.EXPERIMENTS) + 1  # the experiments and notebook 00's tables
    assert all((tmp_path / "report" / "figures" / f"{name}.pdf").is_file() for name in report.FIGURES)
    assert all((tmp_path / "report" / "tables" / f"{name}.tex").is_file() for name in report.TABLES)
    assert set(numbers(tmp_path / "report")) == set(report.MACROS)


def test_a_figure_that_fails_becomes_a_placeholder_and_a_warning(study, tmp_path, monkeypatch):
    def broken(root, profile):
        raise ValueError("cannot draw")

    broken.size = figures.lr_search_heatmap.size
    monkeypatch.setattr(report, "FIGURES", {"lr_search": broken, "drift": figures.drift_figure})
    warnings = report.write_report(study[0], tmp_path / "report", "smoke")
    failed = [message for message in warnings if "failed" in message]
    assert len(failed) == 1 and "lr_search" in failed[0] and "cannot draw" in failed[0]
    assert (tmp_path / "report" / "figures" / "lr_search.pdf").is_file()
    assert (tmp_path / "report" / "figures" / "drift.pdf").is_file()  # the rest of the report is unaffected
    assert numbers(tmp_path / "report")["ChosenLr"] == "0.1"


# --------------------------------------------------------------------------- building


def test_page_counts_read_the_latex_log_and_the_body_label(tmp_path):
    (tmp_path / "main.log").write_text("...\nOutput written on main.pdf (9 pages, 285121 bytes).\n")
    (tmp_path / "main.aux").write_text("\\newlabel{LastBodyPage}{{5}{8}{Conclusion}{section.5}{}}\n")
    assert report.page_counts(tmp_path) == {"pages": 9, "body_pages": 8}


def test_build_pdf_without_latexmk_says_how_to_install_tex(tmp_path, monkeypatch):
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y latexmk"):
        report.build_pdf(tmp_path)


def test_notebook_07_declares_the_parameters_the_pipeline_passes():
    declared = papermill.inspect_notebook(str(REPO / "notebooks" / "07_report_figures.ipynb"))
    assert {"profile", "results_dir", "drive_dir", "report_dir", "build_pdf"} <= set(declared)


# --------------------------------------------------------------------------- end to end (smoke pipeline)


@needs_tex
@pytest.mark.slow
def test_smoke_pipeline_builds_the_report_pdf(smoke_results):
    report_dir = smoke_results["report_dir"]
    assert (report_dir / "main.pdf").is_file() and report.page_counts(report_dir)["pages"] >= 1


@needs_tex
@pytest.mark.slow
def test_smoke_report_body_fits_the_page_limit(smoke_results):
    pages = report.page_counts(smoke_results["report_dir"])["body_pages"]
    assert pages is not None and pages <= report.BODY_PAGE_LIMIT


@pytest.mark.slow
def test_smoke_numbers_say_they_come_from_the_smoke_profile(smoke_results):
    assert numbers(smoke_results["report_dir"])["ResultsProfile"] == "smoke"


@pytest.mark.slow
def test_smoke_pipeline_fills_every_number_and_table(smoke_results):
    report_dir = smoke_results["report_dir"]
    missing = [name for name, value in numbers(report_dir).items() if value == report.NA]
    placeholders = [
        name
        for name in report.TABLES
        if "No results yet" in (report_dir / "tables" / f"{name}.tex").read_text()
    ]
    assert missing == [] and placeholders == []


@pytest.mark.slow
def test_smoke_results_draw_every_figure_without_warnings(smoke_results, tmp_path):
    assert report.write_report(smoke_results["results_dir"] / "smoke", tmp_path, "smoke") == []


def test_results_zip_holds_the_masks_the_mask_tables_compare(study):
    import zipfile

    _, results_zip = report.archive(study[1], study[0])
    masks = sorted(name for name in zipfile.ZipFile(results_zip).namelist() if name.endswith("prepared.pt"))
    assert masks == [f"runs/{MASK_RULES}-iid-{rule}-s0/prepared.pt" for rule in ("least_sensitive", "random")]


def test_archives_hold_an_overleaf_project_and_the_runs_without_checkpoints(tmp_path):
    import zipfile

    report_dir, root = tmp_path / "report", tmp_path / "results" / "smoke"
    for path in (
        report_dir / "main.tex",
        report_dir / "refs.bib",
        report_dir / "figures" / "drift.pdf",
        report_dir / "tables" / "fedavg.tex",
        report_dir / "generated" / "numbers.tex",
        report_dir / "main.aux",
        root / "hparams.json",
        root / "runs" / "iid-s0-ab" / "config.json",
        root / "runs" / "iid-s0-ab" / "metrics.csv",
        root / "runs" / "iid-s0-ab" / "summary.json",
        root / "runs" / "iid-s1-cd" / "checkpoint-000003.pt",
        root / "runs" / "other-s0-ef" / "summary.json",
    ):  # a run no grid names
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    add_to_grid(root, "02_fedavg_iid", "iid-s0-ab")
    add_to_grid(root, "02_fedavg_iid", "iid-s1-cd")  # named, not complete: nothing of it is archived
    report_zip, results_zip = report.archive(report_dir, root)
    assert sorted(zipfile.ZipFile(report_zip).namelist()) == [
        "figures/drift.pdf",
        "generated/numbers.tex",
        "main.tex",
        "refs.bib",
        "tables/fedavg.tex",
    ]
    assert sorted(zipfile.ZipFile(results_zip).namelist()) == [
        "grids/02_fedavg_iid.json",
        "hparams.json",
        "runs/iid-s0-ab/config.json",
        "runs/iid-s0-ab/metrics.csv",
        "runs/iid-s0-ab/summary.json",
    ]


def test_a_remedy_under_the_frozen_head_is_measured_against_sparse_fedavg_not_dense_fedavg():
    group = pd.DataFrame(
        {
            "method": ["FedAvg", "FedAvgM", "sparse", "SCAFFOLD (sparse)"],
            "val": [0.40, 0.42, 0.60, 0.65],
            "mean": [0.40, 0.41, 0.60, 0.62],
            "std": [0.0] * 4,
        }
    )
    assert report._best_remedy("Nc=5", group).endswith("; +2.0 points over sparse)")
    alone = report._best_remedy("Nc=5", group.iloc[:3])  # sparse FedAvg best: no family member to beat
    assert alone.startswith("sparse on $N_c{=}5$") and "points" not in alone
