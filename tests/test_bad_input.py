"""Bad input stops before any compute with an error that names the parameter and what is allowed.

For every public entry point (and the notebook parameters, through the
pipeline) the invalid values a user can type: negative, zero, out of range,
the wrong type ("0.1" as a string, 2.5 or True for an integer), unknown
names, impossible sharding, the dataset missing while offline, an unwritable
results_dir. Each case asserts the message and, where something could have
been written, that nothing was. SparseSGDM and fisher_scores /
calibrate_masks have their own cases in test_optim.py and test_fisher.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedta_utils import experiments, pipeline, runs
from fedta_utils.checks import ConfigError
from fedta_utils.data import prepare_data, train_val_split
from fedta_utils.fedavg import FedAvgConfig, run_fedavg
from fedta_utils.models import build_model
from fedta_utils.pipeline import NotebookFailed, run_pipeline
from fedta_utils.prepare import FineTuneSpec
from fedta_utils.sharding import dirichlet_shards, iid_shards, make_shards, non_iid_shards
from fedta_utils.training import CentralizedConfig, run_centralized
from fedta_utils.workspace import declared_parameters, discover_notebooks, setup_notebook, setup_workspace


def raises(fragment: str, exception=ConfigError):
    """pytest.raises for a message that contains `fragment` literally."""
    return pytest.raises(exception, match=re.escape(fragment))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------- setup_workspace

WORKSPACE_CASES = [
    ({"profile": "fast"}, "profile='fast' is not allowed; choose one of ['smoke', 'full']"),
    ({"profile": None}, "profile=None is not allowed; choose one of ['smoke', 'full']"),
    ({"download": "no"}, "download must be True or False, got 'no' (str)"),
    ({"device": "gpu"}, "device='gpu' is not allowed; choose one of 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": 0}, "device must be a string: 'auto', 'cpu', 'cuda' or 'cuda:N', got 0"),
    ({"results_dir": None}, "results_dir must be a folder or file path (a non-empty str or Path), got None"),
    ({"results_dir": ""}, "results_dir must be a folder or file path (a non-empty str or Path), got ''"),
    ({"data_dir": 5}, "data_dir must be a folder or file path (a non-empty str or Path), got 5 (int)"),
    ({"weights_path": "/nonexistent/dino.pth"}, "weights_path='/nonexistent/dino.pth' is not a file"),
    ({"drive_dir": "/content/drive/MyDrive/fedta"}, "is a Google Drive path but this is not Colab"),
    (
        {"drive_dir": "/nonexistent/parent/fedta"},
        "drive_dir='/nonexistent/parent/fedta': its parent folder does not exist",
    ),
]


@pytest.mark.parametrize("arguments, message", WORKSPACE_CASES, ids=[str(a) for a, _ in WORKSPACE_CASES])
def test_setup_workspace_rejects_bad_arguments_before_creating_anything(arguments, message, tmp_path):
    defaults = {
        "profile": "smoke",
        "results_dir": tmp_path / "results",
        "data_dir": tmp_path / "data",
        "device": "cpu",
        "download": False,
    }
    with raises(message):
        setup_workspace(**{**defaults, **arguments})
    assert not (tmp_path / "results").exists()


def test_setup_workspace_rejects_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with raises("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'"):
        setup_workspace("smoke", tmp_path / "results", device="cuda")


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder nobody can create files in: read-only, or (as root, who ignores modes) under a file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        yield folder
    else:  # running as root
        (folder / "probe").unlink()
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        yield blocker / "results"
    folder.chmod(0o700)


def test_setup_workspace_rejects_an_unwritable_results_dir(unwritable_dir):
    with raises(f"results_dir='{unwritable_dir}' is not writable"):
        setup_workspace("smoke", unwritable_dir, device="cpu")


def test_setup_workspace_leaves_another_processes_probe_file_alone(tmp_path):
    staging = tmp_path / "results" / "smoke" / ".staging"
    staging.mkdir(parents=True)
    theirs = staging / "write-test.tmp"
    theirs.write_bytes(b"another process is probing this folder")
    setup_workspace("smoke", tmp_path / "results", device="cpu")
    assert theirs.read_bytes() == b"another process is probing this folder"


# --------------------------------------------------------------------------- data

LOAD_DATA_CASES = [
    ({"dataset": "cifar10"}, "dataset='cifar10' is not allowed; choose one of ['cifar100', 'synthetic']"),
    ({"val_fraction": 0}, "val_fraction=0 is out of range; it must be in (0, 1)"),
    ({"val_fraction": 1.0}, "val_fraction=1 is out of range; it must be in (0, 1)"),
    ({"val_fraction": -0.1}, "val_fraction=-0.1 is out of range; it must be in (0, 1)"),
    ({"val_fraction": "0.1"}, "val_fraction must be a number in (0, 1), got '0.1' (str)"),
    ({"split_seed": -1}, "split_seed=-1 is too small; it must be >= 0"),
    ({"split_seed": 1.5}, "split_seed must be an integer >= 0, got 1.5 (float)"),
    ({"synthetic_train_size": 50}, "synthetic_train_size=50 is too small; it must be >= 100"),
    ({"synthetic_test_size": True}, "synthetic_test_size must be an integer >= 100, got True (bool)"),
]


@pytest.mark.parametrize("arguments, message", LOAD_DATA_CASES, ids=[str(a) for a, _ in LOAD_DATA_CASES])
def test_load_data_rejects_bad_arguments_before_loading(arguments, message, workspace):
    defaults = {
        "dataset": "synthetic",
        "val_fraction": 0.1,
        "split_seed": 0,
        "synthetic_train_size": 2000,
        "synthetic_test_size": 500,
    }
    with raises(message):
        workspace.load_data(**{**defaults, **arguments})
    assert not (workspace.root / "splits").exists()


def test_missing_cifar100_offline_names_data_dir_and_the_way_out(workspace):
    with raises(f"CIFAR-100 is not available under data_dir='{workspace.data_dir}'", FileNotFoundError):
        workspace.load_data("cifar100")
    assert not (workspace.root / "splits").exists()


def test_prepare_data_rejects_a_download_flag_that_is_not_a_bool():
    with raises("download must be True or False, got 'no' (str)"):
        prepare_data("synthetic", download="no")


LABELS = np.repeat(np.arange(100), 18)  # the smoke profile's train split: 18 images of each of 100 classes

SPLIT_CASES = [
    ({"val_fraction": 1.5}, "val_fraction=1.5 is out of range; it must be in (0, 1)"),
    ({"val_fraction": "0.1"}, "val_fraction must be a number in (0, 1), got '0.1' (str)"),
    ({"seed": -1}, "seed=-1 is too small; it must be >= 0"),
    ({"seed": "0"}, "seed must be an integer >= 0, got '0' (str)"),
    ({"seed": 2.5}, "seed must be an integer >= 0, got 2.5 (float)"),
]


@pytest.mark.parametrize("arguments, message", SPLIT_CASES, ids=[str(a) for a, _ in SPLIT_CASES])
def test_train_val_split_rejects_bad_arguments(arguments, message):
    with raises(message):
        train_val_split(LABELS, **{"val_fraction": 0.1, "seed": 0, **arguments})


# --------------------------------------------------------------------------- sharding

SHARDING_CASES = [
    (iid_shards, (0, 0), "num_clients=0 is too small; it must be >= 1"),
    (iid_shards, (5000, 0), "num_clients=5000 is too large; it must be <= 1800"),
    (iid_shards, (2.5, 0), "num_clients must be an integer in [1, 1800], got 2.5 (float)"),
    (iid_shards, (10, -1), "seed=-1 is too small; it must be >= 0"),
    (iid_shards, (10, "0"), "seed must be an integer >= 0, got '0' (str)"),
    (non_iid_shards, (100, 200, 0), "classes_per_client=200 is too large; it must be <= 100"),
    (non_iid_shards, (100, 0, 0), "classes_per_client=0 is too small; it must be >= 1"),
    (non_iid_shards, (100, "5", 0), "classes_per_client must be an integer in [1, 100], got '5' (str)"),
    (
        non_iid_shards,
        (10, 5, 0),
        "classes_per_client=5 with num_clients=10 gives 50 class slices for 100 "
        "classes: some classes would be left out; need num_clients * "
        "classes_per_client >= 100",
    ),
    (
        non_iid_shards,
        (100, 50, 0),
        "has 18 samples but must be cut into 50 slices (num_clients=100, "
        "classes_per_client=50); lower one of them",
    ),
    (non_iid_shards, (100, 5, True), "seed must be an integer >= 0, got True (bool)"),
    (dirichlet_shards, (10, 0, 0), "dirichlet_alpha=0 is out of range; it must be in (0, inf)"),
    (dirichlet_shards, (10, -1.0, 0), "dirichlet_alpha=-1 is out of range; it must be in (0, inf)"),
    (dirichlet_shards, (10, "0.1", 0), "dirichlet_alpha must be a number in (0, inf), got '0.1' (str)"),
    (dirichlet_shards, (10, float("inf"), 0), "dirichlet_alpha=inf must be a finite number in (0, inf)"),
    (dirichlet_shards, (10, 0.5, -3), "seed=-3 is too small; it must be >= 0"),
    (
        make_shards,
        ("non-iid", 10, 0),
        "sharding='non-iid' is not allowed; choose one of ['iid', 'non_iid', 'dirichlet']",
    ),
    (make_shards, ("non_iid", 10, 0), "sharding='non_iid' needs classes_per_client (an integer >= 1)"),
    (make_shards, ("dirichlet", 10, 0), "sharding='dirichlet' needs dirichlet_alpha (a number > 0)"),
]


@pytest.mark.parametrize(
    "function, arguments, message", SHARDING_CASES, ids=[f"{f.__name__}{a}" for f, a, _ in SHARDING_CASES]
)
def test_sharding_rejects_bad_and_impossible_requests(function, arguments, message):
    with raises(message):
        function(LABELS, *arguments)


# --------------------------------------------------------------------------- models

MODEL_CASES = [
    ({"name": "vit_b16"}, "model='vit_b16' is not allowed; choose one of ['dino_vits16', 'tiny_vit']"),
    ({"num_classes": 100.0}, "num_classes must be an integer >= 2, got 100.0 (float)"),
    ({"num_classes": 0}, "num_classes=0 is too small; it must be >= 2"),
    ({"head_seed": -1}, "head_seed=-1 is too small; it must be >= 0"),
    ({"pretrained": "no"}, "pretrained must be True or False, got 'no' (str)"),
]


@pytest.mark.parametrize("arguments, message", MODEL_CASES, ids=[str(a) for a, _ in MODEL_CASES])
def test_build_model_rejects_bad_arguments(arguments, message):
    with raises(message):
        build_model(**{"name": "tiny_vit", "num_classes": 100, **arguments})


# --------------------------------------------------------------------------- configs

CENTRALIZED_CASES = [
    ({"dataset": "CIFAR100"}, "dataset='CIFAR100' is not allowed; choose one of ['cifar100', 'synthetic']"),
    ({"model": "dino"}, "model='dino' is not allowed; choose one of ['dino_vits16', 'tiny_vit']"),
    ({"seed": -1}, "seed=-1 is too small; it must be >= 0"),
    ({"seed": "0"}, "seed must be an integer >= 0, got '0' (str)"),
    ({"epochs": 0}, "epochs=0 is too small; it must be >= 1"),
    ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5 (float)"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True (bool)"),
    ({"batch_size": -32}, "batch_size=-32 is too small; it must be >= 1"),
    ({"lr": 0}, "lr=0 is out of range; it must be in (0, inf)"),
    ({"lr": "0.1"}, "lr must be a number in (0, inf), got '0.1' (str)"),
    ({"lr": float("nan")}, "lr=nan must be a finite number in (0, inf)"),
    ({"momentum": 1.0}, "momentum=1 is out of range; it must be in [0, 1)"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is out of range; it must be in [0, inf)"),
    (
        {"scheduler": "linear"},
        "scheduler='linear' is not allowed; choose one of ['cosine', 'step', 'constant']",
    ),
    ({"warmup_epochs": 20}, "warmup_epochs=20 is out of range; it must be in [0, 10]"),
    ({"warmup_epochs": -1}, "warmup_epochs=-1 is out of range; it must be in [0, 10]"),
    (
        {"precision": "half"},
        "precision='half' is not allowed; choose one of ['auto', 'fp32', 'bf16', 'fp16']",
    ),
    ({"evaluate_test": "yes"}, "evaluate_test must be True or False, got 'yes' (str)"),
    ({"finetune": {"head": "ridge"}}, "finetune must be a FineTuneSpec, got dict"),
]


@pytest.mark.parametrize("fields, message", CENTRALIZED_CASES, ids=[str(f) for f, _ in CENTRALIZED_CASES])
def test_centralized_config_rejects_bad_fields(fields, message):
    with raises(message):
        CentralizedConfig(**fields)


FEDAVG_CASES = [
    ({"num_clients": 0}, "num_clients=0 is too small; it must be >= 1"),
    ({"participation": 0}, "participation=0 is out of range; it must be in (0, 1]"),
    ({"participation": 1.5}, "participation=1.5 is out of range; it must be in (0, 1]"),
    ({"participation": "0.1"}, "participation must be a number in (0, 1], got '0.1' (str)"),
    ({"local_steps": 0}, "local_steps=0 is too small; it must be >= 1"),
    ({"local_steps": 2.5}, "local_steps must be an integer >= 1, got 2.5 (float)"),
    ({"rounds": -1}, "rounds=-1 is too small; it must be >= 1"),
    ({"batch_size": 0}, "batch_size=0 is too small; it must be >= 1"),
    ({"lr": -0.01}, "lr=-0.01 is out of range; it must be in (0, inf)"),
    ({"momentum": -0.1}, "momentum=-0.1 is out of range; it must be in [0, 1)"),
    ({"lr_schedule": "step"}, "lr_schedule='step' is not allowed; choose one of ['constant', 'cosine']"),
    ({"server_lr": 0}, "server_lr=0 is out of range; it must be in (0, inf)"),
    ({"server_momentum": 1.0}, "server_momentum=1 is out of range; it must be in [0, 1)"),
    (
        {"sharding": "noniid"},
        "sharding='noniid' is not allowed; choose one of ['iid', 'non_iid', 'dirichlet']",
    ),
    ({"sharding": "non_iid"}, "classes_per_client must be an integer >= 1, got None (NoneType)"),
    ({"sharding": "non_iid", "classes_per_client": 0}, "classes_per_client=0 is too small; it must be >= 1"),
    ({"sharding": "dirichlet"}, "dirichlet_alpha must be a number in (0, inf), got None (NoneType)"),
    (
        {"sharding": "dirichlet", "dirichlet_alpha": 0.0},
        "dirichlet_alpha=0 is out of range; it must be in (0, inf)",
    ),
    ({"augment": 1}, "augment must be True or False, got 1 (int)"),
    ({"eval_points": 0}, "eval_points=0 is too small; it must be >= 1"),
    ({"eval_subset": 0}, "eval_subset=0 is too small; it must be >= 1"),
    (
        {"precision": "fp64"},
        "precision='fp64' is not allowed; choose one of ['auto', 'fp32', 'bf16', 'fp16']",
    ),
    ({"finetune": "ridge"}, "finetune must be a FineTuneSpec, got str"),
]


@pytest.mark.parametrize("fields, message", FEDAVG_CASES, ids=[str(f) for f, _ in FEDAVG_CASES])
def test_fedavg_config_rejects_bad_fields(fields, message):
    with raises(message):
        FedAvgConfig(**fields)


SPEC_CASES = [
    ({"head": "linear"}, "head='linear' is not allowed; choose one of ['train', 'ridge']"),
    ({"ridge_lambda": 0}, "ridge_lambda=0 is out of range; it must be in (0, inf)"),
    ({"mask_rule": "fisher"}, "mask_rule='fisher' is not allowed; choose one of [None, 'least_sensitive'"),
    ({"sparsity": -0.1}, "sparsity=-0.1 is out of range; it must be in [0, 1)"),
    ({"sparsity": "0.9"}, "sparsity must be a number in [0, 1), got '0.9' (str)"),
    ({"calibration_rounds": 2.5}, "calibration_rounds must be an integer >= 1, got 2.5 (float)"),
    ({"calibration_samples": 0}, "calibration_samples=0 is too small; it must be >= 1"),
    ({"label_mode": "empirical"}, "label_mode='empirical' is not allowed; choose one of ['sampled', 'true']"),
    ({"eligible": "all"}, "eligible='all' is not allowed; choose one of ['backbone', 'blocks', 'matrices']"),
]


@pytest.mark.parametrize("fields, message", SPEC_CASES, ids=[str(f) for f, _ in SPEC_CASES])
def test_finetune_spec_rejects_bad_fields(fields, message):
    with raises(message):
        FineTuneSpec(**fields)


# --------------------------------------------------------------------------- runs

SMALL_FEDAVG = dict(
    dataset="synthetic",
    model="tiny_vit",
    num_clients=10,
    participation=0.2,
    rounds=1,
    local_steps=1,
    batch_size=8,
)
SMALL_CENTRAL = dict(dataset="synthetic", model="tiny_vit", epochs=1, batch_size=64)
RUNNERS = {
    "run_fedavg": (run_fedavg, FedAvgConfig(**SMALL_FEDAVG)),
    "run_centralized": (run_centralized, CentralizedConfig(**SMALL_CENTRAL)),
}
OPTION_CASES = [
    ({"eval_batch_size": 0}, "eval_batch_size=0 is too small; it must be >= 1"),
    ({"eval_batch_size": "256"}, "eval_batch_size must be an integer >= 1, got '256' (str)"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 is too small; it must be >= 1"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be an integer >= 1, got 1.5 (float)"),
    ({"checkpoint_every": True}, "checkpoint_every must be an integer >= 1, got True (bool)"),
]


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("options, message", OPTION_CASES, ids=[str(o) for o, _ in OPTION_CASES])
def test_run_options_are_checked_before_a_run_folder_exists(runner, options, message, workspace, small_data):
    run, config = RUNNERS[runner]
    with raises(message):
        run(workspace, small_data, config, progress=False, **options)
    assert not (workspace.root / "bad_options").exists()


IMPOSSIBLE_SHARDS = [
    (
        {"sharding": "non_iid", "classes_per_client": 200},
        "classes_per_client=200 is too large; it must be <= 100",
    ),
    (
        {"sharding": "non_iid", "classes_per_client": 5},
        "some classes would be left out; need num_clients * classes_per_client >= 100",
    ),
    ({"num_clients": 5000}, "num_clients=5000 is too large; it must be <= 1800"),
]


@pytest.mark.parametrize("fields, message", IMPOSSIBLE_SHARDS, ids=[str(f) for f, _ in IMPOSSIBLE_SHARDS])
def test_impossible_sharding_stops_run_fedavg_before_a_run_folder_exists(
    fields, message, workspace, small_data
):
    config = FedAvgConfig(**{**SMALL_FEDAVG, **fields})
    with raises(message):
        run_fedavg(workspace, small_data, config, progress=False)
    assert not (workspace.root / "impossible").exists()


def test_a_config_for_other_data_is_refused_before_a_run_folder_exists(workspace, small_data):
    config = FedAvgConfig(**{**SMALL_FEDAVG, "dataset": "cifar100"})
    with raises("config.dataset='cifar100' but the data passed in is 'synthetic'"):
        run_fedavg(workspace, small_data, config, progress=False)
    assert not (workspace.root / "other_data").exists()


# ------------------------------------------------------------------------ grids (the notebooks' parameters)

FEDAVG_SETTINGS = dict(
    dataset="synthetic",
    model="tiny_vit",
    num_clients=100,
    participation=0.1,
    client_batch_size=32,
    lr=0.05,
    weight_decay=0.0,
    momentum=0.9,
    lr_schedule="constant",
    server_lr=1.0,
    server_momentum=0.0,
    eval_points=2,
    precision="auto",
)
SPARSE_GRID = dict(
    FEDAVG_SETTINGS,
    seeds=[0],
    local_steps=2,
    rounds=4,
    sparse_classes_per_client=5,
    sparsity=0.9,
    calibration_rounds=2,
    sparse_lr=0.01,
)
SPARSE_SEARCH = dict(
    SPARSE_GRID,
    sparsities=[0.9],
    calibration_rounds_grid=[1],
    sparse_search_lrs=[0.01],
    sparse_search_rounds=2,
)
FEDAVG_SEARCH = dict(
    FEDAVG_SETTINGS,
    seeds=[0],
    local_steps=2,
    rounds=4,
    fedavg_search_lrs=[0.03],
    fedavg_search_weight_decays=[0.0],
    fedavg_search_rounds=2,
)
SPARSE_CENTRAL = dict(
    SPARSE_GRID,
    epochs=1,
    warmup_epochs=0.0,
    central_batch_size=64,
    central_momentum=0.9,
    central_scheduler="cosine",
    central_weight_decay=0.0,
    sparse_central_lr=0.05,
    sparsity=0.9,
    calibration_rounds=2,
)
CENTRAL_SETTINGS = dict(
    dataset="synthetic",
    model="tiny_vit",
    seeds=[0],
    epochs=2,
    central_batch_size=64,
    central_momentum=0.9,
    search_lrs=[0.03],
    search_weight_decays=[0.0],
    search_epochs=1,
    schedulers=["cosine"],
    warmup_epochs=0.5,
    precision="auto",
)

GRID_CASES = [
    (
        experiments.search_configs,
        CENTRAL_SETTINGS,
        {"search_lrs": []},
        "search_lrs must not be empty: give a list of numbers in (0, inf)",
    ),
    (
        experiments.search_configs,
        CENTRAL_SETTINGS,
        {"search_lrs": [0.1, -1]},
        "search_lrs[1]=-1 is out of range; it must be in (0, inf)",
    ),
    (
        experiments.search_configs,
        CENTRAL_SETTINGS,
        {"search_weight_decays": "0.0"},
        "search_weight_decays must be a list of numbers in [0, inf), got '0.0'",
    ),
    (
        experiments.search_configs,
        CENTRAL_SETTINGS,
        {"search_epochs": 0},
        "search_epochs=0 is too small; it must be >= 1",
    ),
    (
        experiments.scheduler_configs,
        dict(CENTRAL_SETTINGS, scheduler_hparams={"cosine": {"lr": 0.1, "weight_decay": 0.0}}),
        {"seeds": 0},
        "seeds must be a list of integers >= 0, got 0",
    ),
    (
        experiments.scheduler_configs,
        dict(CENTRAL_SETTINGS, scheduler_hparams={"cosine": {"lr": 0.1, "weight_decay": 0.0}}),
        {"schedulers": "cosine"},
        "schedulers must be a list of names from ['cosine', 'step', 'constant'], got 'cosine'",
    ),
    (
        experiments.fedavg_iid_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], local_steps=2, rounds=4),
        {"seeds": []},
        "seeds must not be empty: give a list of integers >= 0",
    ),
    # a repeated seed is the same run again: a table would count it as two independent runs
    (
        experiments.fedavg_iid_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], local_steps=2, rounds=4),
        {"seeds": [0, 1, 0]},
        "seeds=[0, 1, 0] repeats 0: the same value twice makes the same runs twice",
    ),
    (
        experiments.heterogeneity_configs,
        dict(FEDAVG_SETTINGS, seeds=[1, 1], classes_per_client_grid=[1], local_steps_grid=[2], base_rounds=4),
        {},
        "seeds=[1, 1] repeats 1",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"seeds": [0, 0]},
        "seeds=[0, 0] repeats 0",
    ),
    (
        experiments.sparse_central_configs,
        SPARSE_CENTRAL,
        {"seeds": [3, 3]},
        "seeds=[3, 3] repeats 3",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"seeds": [0, 0]},
        "seeds=[0, 0] repeats 0",
    ),
    (
        experiments.fedavg_iid_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], local_steps=2, rounds=4),
        {"rounds": 0},
        "rounds=0 is too small; it must be >= 1",
    ),
    (
        experiments.fedavg_iid_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], local_steps=2, rounds=4),
        {"participation": 0},
        "participation=0 is out of range; it must be in (0, 1]",
    ),
    (
        experiments.heterogeneity_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], classes_per_client_grid=[1], local_steps_grid=[2], base_rounds=4),
        {"classes_per_client_grid": [0]},
        "classes_per_client_grid[0]=0 is too small; it must be >= 1",
    ),
    (
        experiments.heterogeneity_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], classes_per_client_grid=[1], local_steps_grid=[2], base_rounds=4),
        {"local_steps_grid": []},
        "local_steps_grid must not be empty: give a list of integers >= 1",
    ),
    (
        experiments.heterogeneity_configs,
        dict(FEDAVG_SETTINGS, seeds=[0], classes_per_client_grid=[1], local_steps_grid=[2], base_rounds=4),
        {"base_rounds": 0},
        "base_rounds=0 is too small; it must be >= 1",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"sparsities": [1.0]},
        "sparsities[0]=1 is out of range; it must be in [0, 1)",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"calibration_rounds_grid": [0]},
        "calibration_rounds_grid[0]=0 is too small; it must be >= 1",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"sparse_classes_per_client": 0},
        "sparse_classes_per_client=0 is too small; it must be >= 1",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"head": "frozen"},
        "head='frozen' is not allowed; choose one of ['train', 'ridge']",
    ),
    (
        experiments.sparse_central_configs,
        SPARSE_CENTRAL,
        {"sparsity": 1.5},
        "sparsity=1.5 is out of range; it must be in [0, 1)",
    ),
    (
        experiments.sparse_central_configs,
        SPARSE_CENTRAL,
        {"central_batch_size": 0},
        "central_batch_size=0 is too small; it must be >= 1",
    ),
    (
        experiments.sparse_fl_configs,
        dict(SPARSE_GRID, sparsities=[0.9], calibration_rounds_grid=[1]),
        {"sparse_lr": None},
        "sparse_lr must be a number",
    ),
    (
        experiments.scheduler_configs,
        dict(CENTRAL_SETTINGS, scheduler_hparams={"cosine": {"lr": 0.1, "weight_decay": 0.0}}),
        {"schedulers": ["cosine", "step"]},
        "scheduler_hparams has no lr and weight decay for scheduler 'step'",
    ),
    (
        experiments.sparse_central_configs,
        SPARSE_CENTRAL,
        {"central_scheduler": "linear"},
        "central_scheduler='linear' is not allowed; choose one of ['cosine', 'step', 'constant']",
    ),
    (
        experiments.sparse_central_configs,
        SPARSE_CENTRAL,
        {"sparse_central_lr": 0.0},
        "sparse_central_lr=0 is out of range; it must be in (0, inf)",
    ),
    (
        experiments.sparse_central_search_configs,
        dict(SPARSE_CENTRAL, sparse_central_search_lrs=[0.01], search_epochs=1),
        {"search_epochs": 0},
        "search_epochs=0 is too small; it must be >= 1",
    ),
    (
        experiments.sparse_search_configs,
        SPARSE_SEARCH,
        {"sparse_search_lrs": [0.0]},
        "sparse_search_lrs[0]=0 is out of range; it must be in (0, inf)",
    ),
    (
        experiments.sparse_search_configs,
        SPARSE_SEARCH,
        {"sparse_search_rounds": 0},
        "sparse_search_rounds=0 is too small; it must be >= 1",
    ),
    # notebook 04 runs its lr search before the sparse grid: the grid's parameters must fail first
    (
        experiments.sparse_search_configs,
        SPARSE_SEARCH,
        {"sparsities": [1.0]},
        "sparsities[0]=1 is out of range; it must be in [0, 1)",
    ),
    (
        experiments.sparse_search_configs,
        SPARSE_SEARCH,
        {"rounds": 0},
        "rounds=0 is too small; it must be >= 1",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"sparse_lr": -1.0},
        "sparse_lr=-1 is out of range; it must be in (0, inf)",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"rules": ["fisher"]},
        "rules[0]='fisher' is not allowed; choose one of ['least_sensitive'",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"rules": "random"},
        "rules must be a list of names from ['least_sensitive'",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"rule_sparsities": [-0.5]},
        "rule_sparsities[0]=-0.5 is out of range; it must be in [0, 1)",
    ),
    (
        experiments.mask_rule_configs,
        dict(SPARSE_GRID, rules=["random"], rule_sparsities=[0.9], rule_calibration_rounds=2),
        {"rule_calibration_rounds": 0},
        "rule_calibration_rounds=0 is too small; it must be >= 1",
    ),
]


NOTEBOOK_GRID_CASES = [  # a parameter of a grid that runs after the notebook's search fails before it
    ("01", {"seeds": [-1]}, "seeds[0]=-1 is too small; it must be >= 0"),
    (
        "01",
        {"schedulers": ["linear"]},
        "schedulers[0]='linear' is not allowed; choose one of ['cosine', 'step', ",
    ),
    ("01", {"epochs": 0}, "epochs=0 is too small; it must be >= 1"),
    ("01", {"seeds": [2, 2]}, "seeds=[2, 2] repeats 2"),
    ("02", {"rounds": -3}, "rounds=-3 is too small; it must be >= 1"),
    ("02", {"seeds": [1, 1]}, "seeds=[1, 1] repeats 1"),
    ("04", {"central_batch_size": 0}, "central_batch_size=0 is too small; it must be >= 1"),
    ("03", {"classes_per_client_grid": [5, 5]}, "classes_per_client_grid=[5, 5] repeats 5"),  # every list
    ("05", {"rule_sparsities": [0.9, 0.9]}, "rule_sparsities=[0.9, 0.9] repeats 0.9"),
    ("05", {"rules": ["random", "random"]}, "rules=['random', 'random'] repeats 'random'"),
]


@pytest.mark.parametrize(
    "key, bad, message", NOTEBOOK_GRID_CASES, ids=[f"{k}-{b}" for k, b, _ in NOTEBOOK_GRID_CASES]
)
def test_a_notebook_checks_the_grids_after_its_search_before_anything_runs(key, bad, message):
    params = pipeline.notebook_values(discover_notebooks()[key], "smoke", {})
    with raises(message):
        experiments.check_notebook(key, {**params, **bad})


@pytest.mark.parametrize(
    "function, settings, bad, message", GRID_CASES, ids=[f"{f.__name__}-{b}" for f, _, b, _ in GRID_CASES]
)
def test_grid_parameters_are_checked_with_their_notebook_names(function, settings, bad, message):
    with raises(message):
        function(**{**settings, **bad})


def test_run_grid_checks_every_config_against_the_data_before_the_first_run(workspace, small_data):
    configs = experiments.heterogeneity_configs(
        **dict(FEDAVG_SETTINGS, seeds=[0], classes_per_client_grid=[200], local_steps_grid=[1], base_rounds=1)
    )
    assert configs[0].sharding == "iid"  # a valid run comes first and must not start
    with raises("classes_per_client=200 is too large; it must be <= 100"):
        experiments.run_grid(run_fedavg, workspace, small_data, "grid", configs=configs, params={})
    assert not (workspace.root / "grid").exists()


# --------------------------------------------------------------------------- pipeline command line


def test_pipeline_rejects_an_unknown_profile_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        pipeline.main(["--profile", "fast"])
    assert stopped.value.code == 2
    assert (
        "argument --profile: invalid choice: 'fast' (choose from 'full', 'smoke')" in capsys.readouterr().err
    )


def test_run_pipeline_rejects_an_unknown_profile(tmp_path):
    with raises("profile='fast' is not allowed; choose one of ['smoke', 'full']"):
        run_pipeline("fast", results_dir=tmp_path / "results")
    assert not (tmp_path / "results").exists()


PIPELINE_CASES = [
    (["--only", "09"], "--only ['09']: no such notebook; available: ['00', '01', "),
    (
        ["-p", "learning_rate", "0.1"],
        "-p learning_rate: no selected notebook declares a parameter of that name",
    ),
    (
        ["--only", "00", "-p", "rounds", "3"],
        "-p rounds: no selected notebook declares a parameter of that name",
    ),
]


@pytest.mark.parametrize("arguments, message", PIPELINE_CASES, ids=[" ".join(a) for a, _ in PIPELINE_CASES])
def test_pipeline_rejects_unknown_names_before_running_a_notebook(arguments, message, tmp_path, capsys):
    code = pipeline.main(["--profile", "smoke", "--results-dir", str(tmp_path / "results"), *arguments])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_pipeline_rejects_an_unwritable_results_dir(unwritable_dir, capsys):
    code = pipeline.main(["--profile", "smoke", "--only", "00", "--results-dir", str(unwritable_dir)])
    assert code == 1
    assert f"results_dir='{unwritable_dir}' is not writable" in capsys.readouterr().err


# --------------------------------------------------------------------------- notebook parameters (papermill)

NOTEBOOK_CASES = [
    # (notebook, bad -p values, message, experiment folder that must not exist)
    (
        "02",
        {"participation": 0},
        "participation=0 is out of range; it must be in (0, 1]",
        experiments.FEDAVG_IID,
    ),
    (
        "03",
        {"classes_per_client_grid": [200]},
        "classes_per_client=200 is too large; it must be <= 100",
        experiments.HETEROGENEITY,
    ),
    ("01", {"schedulers": ["linear"]}, "schedulers[0]='linear' is not allowed", experiments.LR_SEARCH),
    # notebook 02 runs its lr search before its iid grid: the grid's parameters must fail first
    ("02", {"seeds": [0, 0]}, "seeds=[0, 0] repeats 0", experiments.FEDAVG_LR_SEARCH),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook, overrides, message, experiment",
    NOTEBOOK_CASES,
    ids=[f"{n}-{o}" for n, o, _, _ in NOTEBOOK_CASES],
)
def test_bad_notebook_parameter_fails_in_the_notebook_before_any_training(
    notebook, overrides, message, experiment, tmp_path
):
    tuned = {"lr": 0.05, "weight_decay": 0.0} if notebook == "03" else {}
    with raises(message, NotebookFailed):
        run_pipeline("smoke", [notebook], tmp_path / "results", {**tuned, **overrides})
    root = tmp_path / "results" / "smoke"
    assert not runs.grid_path(root, experiment).exists() and not (root / runs.RUNS_DIR).exists()
    assert not [p for p in files_under(root) if p.suffix == ".pt"]  # no checkpoint, no model anywhere


# Where any string is a valid value: a folder name.
PATH_PARAMETERS = {"results_dir", "data_dir", "drive_dir"}
# What the searches of notebooks 01, 02 and 04 stored, so that 03-05 can start.
TUNED = {
    "central_scheduler": "cosine",
    "central_weight_decay": 0.0,
    "fedavg_lr": 0.1,
    "fedavg_weight_decay": 0.0,
    "sparse_lr": 0.003,
}


def bad_value(default):
    """A value of the parameter's own type that no parameter of that type allows."""
    if isinstance(default, bool):
        return "yes"
    if isinstance(default, int):
        return -3
    if isinstance(default, list):
        return ["bad"]
    if isinstance(default, str):
        return "bad"
    return -1.0  # floats, and values left None for a search to choose


PARAMETER_CASES = [
    (key, name)
    for key in ("01", "02", "03", "04", "05", "06")
    for name in declared_parameters(discover_notebooks()[key])
    if name not in PATH_PARAMETERS
]


@pytest.mark.parametrize("key, name", PARAMETER_CASES, ids=[f"{k}-{n}" for k, n in PARAMETER_CASES])
def test_every_notebook_refuses_a_bad_value_of_each_parameter_before_its_first_run(key, name, tmp_path):
    namespace = pipeline.notebook_values(discover_notebooks()[key], "smoke", {})
    namespace.update(results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "data"))
    namespace[name] = bad_value(namespace[name])
    root = tmp_path / "results" / "smoke"
    root.mkdir(parents=True)
    (root / "hparams.json").write_text(json.dumps(TUNED))
    with pytest.raises(ConfigError, match=re.escape(name)):
        setup_notebook(key, namespace, device="cpu")  # the notebook's first cell after its parameters
    assert not (root / runs.RUNS_DIR).exists() and not (root / runs.GRIDS_DIR).exists()
    assert not list(tmp_path.rglob("metrics.csv"))
