"""The papermill pipeline: parameters, profiles, failures, and the notebooks themselves."""

import ast
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from fedta_utils import pipeline
from fedta_utils.checks import ConfigError
from fedta_utils.workspace import declared_parameters, discover_notebooks, profile_values

NOTEBOOKS = discover_notebooks()
SMOKE = profile_values("smoke")


def test_notebooks_are_numbered_from_00_in_order():
    keys = list(NOTEBOOKS)
    assert keys[:6] == ["00", "01", "02", "03", "04", "05"]
    assert keys == sorted(keys)


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_every_notebook_declares_profile_and_results_dir_and_has_no_outputs(key):
    declared = declared_parameters(NOTEBOOKS[key])
    assert {"profile", "results_dir", "drive_dir"} <= set(declared)
    assert all(info["help"] for info in declared.values()), "every parameter has a comment"
    notebook = json.loads(NOTEBOOKS[key].read_text())
    assert not any(cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")


def test_full_profile_is_the_notebook_defaults():
    for path in NOTEBOOKS.values():
        declared = declared_parameters(path)
        assert declared["profile"]["default"] == '"full"'
        if "dataset" in declared:
            assert declared["dataset"]["default"] == '"cifar100"'
        if "model" in declared:
            assert declared["model"]["default"] == '"dino_vits16"'


def test_every_smoke_value_is_a_parameter_of_some_notebook():
    declared = set()
    for path in NOTEBOOKS.values():
        declared |= set(declared_parameters(path))
    assert set(SMOKE) <= declared, f"profiles.SMOKE names unknown parameters: {set(SMOKE) - declared}"


def test_parameters_passed_to_a_notebook_are_only_those_it_declares(tmp_path):
    values = pipeline.notebook_parameters(NOTEBOOKS["00"], "smoke", tmp_path, {"rounds": 3})
    assert values["profile"] == "smoke" and values["dataset"] == "synthetic"
    assert "rounds" not in values and "model" not in values


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("0.5", 0.5), ("[0, 1]", [0, 1]), ("True", True), ("None", None), ("cifar100", "cifar100")],
)
def test_p_values_are_python_literals_or_strings(text, value):
    assert pipeline.parse_value(text) == value


def test_unknown_parameter_is_rejected_by_name_before_running(tmp_path):
    with pytest.raises(ConfigError, match="-p roundz: no selected notebook declares"):
        pipeline.run_pipeline("smoke", only=["02"], results_dir=tmp_path, overrides={"roundz": 3})
    assert not (tmp_path / "smoke" / "notebooks" / "02_fedavg_iid.ipynb").exists()


def test_unknown_notebook_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="--only \\['42'\\]: no such notebook"):
        pipeline.run_pipeline("smoke", only=["42"], results_dir=tmp_path)


def test_cli_reports_errors_with_a_non_zero_exit(tmp_path, capsys):
    code = pipeline.main(
        ["--profile", "smoke", "--only", "00", "--results-dir", str(tmp_path), "-p", "nope", "1"]
    )
    assert code == 1
    assert "-p nope" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failing_notebook_stops_the_pipeline_showing_its_cell_and_error(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name, source in [
        ("00_ok.ipynb", "x = 1"),
        ("01_broken.ipynb", "raise ValueError('rounds must be > 0')"),
        ("02_never.ipynb", "open('never-ran', 'w')"),
    ]:
        notebook = new_notebook(
            cells=[new_code_cell('profile = "full"\nresults_dir = "results"'), new_code_cell(source)]
        )
        notebook.cells[0].metadata["tags"] = ["parameters"]
        notebook.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(notebook, notebooks / name)
    with pytest.raises(
        pipeline.NotebookFailed,
        match="(?s)01_broken.ipynb failed in cell.*raise ValueError.*ValueError: rounds must be > 0",
    ):
        pipeline.run_pipeline("smoke", results_dir=tmp_path / "results", notebook_dir=notebooks)
    assert (tmp_path / "results" / "smoke" / "notebooks" / "00_ok.ipynb").exists()
    assert not (tmp_path / "results" / "smoke" / "notebooks" / "02_never.ipynb").exists()


@pytest.mark.slow
def test_smoke_pipeline_runs_every_notebook_without_an_error_output(smoke_results):
    executed = smoke_results["results_dir"] / "smoke" / "notebooks"
    assert sorted(p.name for p in executed.glob("*.ipynb")) == sorted(p.name for p in NOTEBOOKS.values())
    for path in executed.glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o["output_type"] == "error"], path.name


EXPERIMENTS = (
    "01_lr_search",
    "01_centralized",
    "02_lr_search",
    "02_fedavg_iid",
    "03_heterogeneity",
    "04_head_only",
    "04_lr_search",
    "04_sparse_fl",
    "04_central_lr_search",
    "04_sparse_centralized",
    "05_mask_rules",
    "06_fedavgm_search",
    "06_fedprox_search",
    "06_ties_search",
    "06_remedies",
)


@pytest.mark.slow
def test_smoke_pipeline_completes_every_experiment(smoke_results):
    from fedta_utils import runs

    root = smoke_results["results_dir"] / "smoke"
    for experiment in EXPERIMENTS:
        named = runs.read_grid(root, experiment)["runs"]
        assert named and len(runs.grid_runs(root, experiment)) == len(named), experiment  # all complete
    assert not list(root.glob("runs/*/checkpoint-*.pt")), "complete runs keep no checkpoints"


@pytest.mark.slow
def test_the_smoke_study_trains_no_configuration_twice(smoke_results):
    from fedta_utils import runs

    root = smoke_results["results_dir"] / "smoke"
    named = {experiment: set(runs.read_grid(root, experiment)["runs"]) for experiment in EXPERIMENTS}
    store = {folder.name for folder in (root / runs.RUNS_DIR).iterdir()}
    assert store == set().union(*named.values())  # one folder per configuration, whichever grids name it
    assert len(named["03_heterogeneity"] & named["02_fedavg_iid"]) == len(
        SMOKE["seeds"]
    )  # iid at the first J
    assert len(named["05_mask_rules"] & named["04_sparse_fl"]) == 2 * len(SMOKE["seeds"])  # least-sensitive
    assert len(named["06_remedies"] & named["04_sparse_fl"]) == 4 * len(SMOKE["seeds"])  # FedAvg, sparse x 2
    trained = [len((root / runs.RUNS_DIR / name / "attempts.log").read_text().splitlines()) for name in store]
    assert trained == [1] * len(store)  # each trained by one attempt, then read back by every other grid


@pytest.mark.slow
def test_no_smoke_identity_holds_an_unresolved_precision(smoke_results):
    root = smoke_results["results_dir"] / "smoke"
    precisions = {json.loads(path.read_text())["precision"] for path in root.glob("runs/*/config.json")}
    assert precisions == {"fp32"}  # a CPU resolves 'auto' to fp32


@pytest.mark.slow
def test_smoke_sparse_fine_tuning_under_the_chosen_head_ends_no_lower_than_the_head_alone(smoke_results):
    from fedta_utils import experiments, results

    root = smoke_results["results_dir"] / "smoke"
    heads = results.load_runs(root, experiments.HEAD_ONLY).query("sharding == 'iid'")
    assert heads["finetune.ridge_lambda"].isna().all()  # the penalty was chosen on validation ...
    assert (heads["ridge_lambda"] < 1.0).all()  # ... and the choice is not the old fixed default
    hparams = json.loads((root / "hparams.json").read_text())
    sparse = results.load_runs(root, experiments.SPARSE_FL).query(
        "sharding == 'iid' and `finetune.mask_rule` == 'least_sensitive' and `finetune.sparsity` == 0.9 "
        "and `finetune.calibration_rounds` == 2"
    )
    assert (sparse["lr"] == hparams["sparse_lr"]).all() and sparse["ridge_lambda"].equals(
        heads["ridge_lambda"].set_axis(sparse.index)
    )  # under the same head, at the lr 04 chose
    assert len(sparse) == len(heads) == len(SMOKE["seeds"])
    assert sparse["final_val_acc"].mean() >= heads["final_val_acc"].mean()


def test_smoke_no_fine_tuning_under_the_chosen_head_diverges(smoke_results):
    """Unclipped, the dense backbone and sparsity 0.5 under the chosen head (penalty 1e-4) reached
    train losses of 80-250 and chance accuracy (0-1 %); every run of 04 and 05 under it clips."""
    from fedta_utils import experiments, results

    root = smoke_results["results_dir"] / "smoke"
    folders = (experiments.SPARSE_LR_SEARCH, experiments.SPARSE_FL, experiments.MASK_RULES)
    runs = pd.concat([results.load_runs(root, folder) for folder in folders], ignore_index=True)
    under_head = runs[runs["finetune.head"] == "ridge"]
    assert len(under_head) > 20 and (under_head["finetune.max_grad_norm"] == 1.0).all()
    assert (under_head["method"] == "dense + ridge head").any() and (under_head["sparsity"] == 0.5).any()
    losses = pd.concat([results.load_curves(root, folder, ["finetune.head"]) for folder in folders])
    assert losses.loc[losses["finetune.head"] == "ridge", "train_loss"].max() < 20  # ln(100) = 4.6
    assert (under_head["final_val_acc"] >= 0.1).all()  # ten times chance


def test_smoke_profile_is_one_parameters_file_that_the_pipeline_and_papermill_read(tmp_path):
    import yaml

    from fedta_utils.workspace import NOTEBOOK_DIR

    assert profile_values("smoke") == yaml.safe_load((NOTEBOOK_DIR / "smoke.yaml").read_text())
    values = pipeline.notebook_parameters(NOTEBOOKS["01"], "smoke", tmp_path, {})
    assert {k: v for k, v in values.items() if k != "results_dir"} == {
        k: v for k, v in SMOKE.items() if k in declared_parameters(NOTEBOOKS["01"])
    }


@pytest.mark.parametrize(
    "profile, name, value",
    [
        ("smoke", "dataset", "cifar100"),
        ("smoke", "model", "dino_vits16"),
        ("full", "dataset", "synthetic"),
        ("full", "model", "tiny_vit"),
    ],
)
def test_a_notebook_refuses_a_profile_that_disagrees_with_what_it_loads(profile, name, value, tmp_path):
    from fedta_utils.workspace import setup_notebook

    namespace = {k: ast.literal_eval(v["default"]) for k, v in declared_parameters(NOTEBOOKS["02"]).items()}
    namespace.update(profile=profile, results_dir=str(tmp_path / "results"), **{name: value})
    if profile == "smoke":
        namespace.update({k: v for k, v in SMOKE.items() if k in namespace and k != name})
    with pytest.raises(ConfigError, match=f"profile='{profile}' with {name}='{value}'"):
        setup_notebook("02", namespace)
    assert not (tmp_path / "results").exists()  # refused before anything is created or loaded


def test_every_copy_of_the_repository_url_is_the_packages_one():
    import re

    from fedta_utils import REPO_URL

    readme = (NOTEBOOKS["00"].parent.parent / "README.md").read_text()
    badges = set(re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob", readme))
    assert badges == {REPO_URL.removeprefix("https://github.com/")}
    for path in NOTEBOOKS.values():
        cells = json.loads(path.read_text())["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert f'REPO_URL = "{REPO_URL}"' in "".join(first_code["source"]), path.name
        badge = "".join(cells[0]["source"])
        assert (
            f"colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}/blob" in badge
        )


@pytest.mark.slow
def test_the_readme_papermill_command_runs_notebook_00_offline(tmp_path):
    import shutil
    import subprocess
    import sys

    repo = NOTEBOOKS["00"].parent.parent
    command = [
        "papermill",
        "notebooks/00_data_splits.ipynb",
        str(tmp_path / "out.ipynb"),
        "-f",
        "notebooks/smoke.yaml",
        "-p",
        "results_dir",
        str(tmp_path / "results"),
    ]
    assert " ".join(command[:2] + ["out.ipynb"] + command[3:5]) in (repo / "README.md").read_text()
    executable = shutil.which("papermill", path=str(Path(sys.executable).parent)) or "papermill"
    for _attempt in (1, 2):  # the background smoke pipeline starts kernels too: they may race for a port
        done = subprocess.run(
            [executable, *command[1:]], cwd=repo, capture_output=True, text=True, timeout=600
        )
        if done.returncode == 0 or pipeline.KERNEL_DIED not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "smoke" / "00_data" / "shard_stats.csv").is_file()


def test_every_run_identity_carries_the_results_format_and_config_json_the_code_version(workspace):
    from fedta_utils.workspace import RESULTS_FORMAT, code_version

    run = workspace.run("a", {"lr": 0.1})
    assert run.config == {"lr": 0.1, "results_format": RESULTS_FORMAT}
    assert run.code_version == code_version() and code_version()


def test_a_parameter_left_none_takes_the_value_the_notebook_that_searched_it_stored(tmp_path):
    from fedta_utils.workspace import setup_notebook

    namespace = {k: ast.literal_eval(v["default"]) for k, v in declared_parameters(NOTEBOOKS["05"]).items()}
    namespace.update(
        {k: v for k, v in SMOKE.items() if k in namespace}, results_dir=str(tmp_path / "results")
    )
    (tmp_path / "results" / "smoke").mkdir(parents=True)
    hparams = tmp_path / "results" / "smoke" / "hparams.json"
    hparams.write_text(json.dumps({"fedavg_lr": 0.1, "fedavg_weight_decay": 1e-4}))
    with pytest.raises(ConfigError, match="sparse_lr=None takes sparse_lr from .* run notebook 04 first"):
        setup_notebook("05", dict(namespace))
    hparams.write_text(json.dumps({"fedavg_lr": 0.1, "fedavg_weight_decay": 1e-4, "sparse_lr": 0.003}))
    _, _, params = setup_notebook("05", dict(namespace))
    assert (params["weight_decay"], params["sparse_lr"]) == (1e-4, 0.003) and "lr" not in params  # 05: no lr
    _, _, params = setup_notebook("05", dict(namespace, sparse_lr=0.02, weight_decay=0.0))  # a set value wins
    assert (params["weight_decay"], params["sparse_lr"]) == (0.0, 0.02)


def test_a_search_fills_only_what_it_chose_and_what_was_left_none():
    from fedta_utils.experiments import with_choice

    best = {"lr": 0.003, "weight_decay": 0.0, "scheduler": "step"}  # the config the search chose
    assert with_choice({"sparse_lr": None, "lr": 0.1}, best, "sparse") == {"sparse_lr": 0.003, "lr": 0.1}
    assert with_choice({"sparse_lr": 0.02}, best, "sparse") == {"sparse_lr": 0.02}
    assert with_choice({"lr": None, "weight_decay": 1e-4}, best, "fedavg") == {
        "lr": 0.003,
        "weight_decay": 1e-4,
    }
    chosen = {"central_scheduler": "step", "central_lr": 0.003, "central_weight_decay": 0.0}
    assert with_choice({}, best, "central") == chosen  # notebook 01 declares none of them


def test_a_kernel_that_dies_at_start_up_is_started_again_and_other_errors_are_not_retried(
    monkeypatch, tmp_path, capsys
):
    import papermill

    calls = []

    def dies_once(*args, **kwargs):
        calls.append(kwargs["parameters"])
        if len(calls) == 1:  # two kernels handed one port: the second dies before any cell runs
            raise RuntimeError(pipeline.KERNEL_DIED)

    monkeypatch.setattr(papermill, "execute_notebook", dies_once)
    pipeline.execute_notebook(NOTEBOOKS["00"], tmp_path / "out.ipynb", {"profile": "smoke"})
    assert calls == [{"profile": "smoke"}] * 2
    assert "the kernel died at start-up" in capsys.readouterr().out

    def always_dies(*args, **kwargs):
        calls.append(1)
        raise RuntimeError(pipeline.KERNEL_DIED)

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", always_dies)
    with pytest.raises(RuntimeError, match=pipeline.KERNEL_DIED):
        pipeline.execute_notebook(NOTEBOOKS["00"], tmp_path / "out.ipynb", {})
    assert len(calls) == pipeline.KERNEL_START_TRIES

    def other_error(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel named python3")

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", other_error)
    with pytest.raises(RuntimeError, match="no kernel named python3"):
        pipeline.execute_notebook(NOTEBOOKS["00"], tmp_path / "out.ipynb", {})
    assert len(calls) == 1
