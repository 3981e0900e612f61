"""Notebook 06: the remedies' grid and searches (experiments.py)."""

from __future__ import annotations

import re

import pytest
from test_grids import notebook_params, search_with

from fedta_utils import experiments
from fedta_utils.checks import ConfigError
from fedta_utils.fedavg import FedAvgConfig


def configs_of(experiment: str, params: dict) -> list[FedAvgConfig]:
    return experiments.grid_configs(experiment, params)


def test_every_method_runs_on_each_non_iid_sharding_and_the_reference_on_iid():
    params = notebook_params("06")
    grid = configs_of(experiments.REMEDIES, params)
    iid = [c for c in grid if c.sharding == "iid"]
    assert {(c.algorithm, c.merge_rule, c.finetune.is_sparse) for c in iid} == {
        ("fedavg", "mean", False),
        ("fedavg", "mean", True),
    }
    per_sharding = len(experiments.REMEDY_METHODS) * len(params["seeds"])
    for nc in params["remedy_classes_per_client"]:
        runs = [c for c in grid if c.classes_per_client == nc]
        assert len(runs) == per_sharding
        assert {c.local_steps for c in runs} == {params["local_steps"]} and {c.rounds for c in runs} == {
            params["rounds"]
        }
    scaffold = [c for c in grid if c.algorithm == "scaffold"]
    assert scaffold and all(c.finetune.is_sparse for c in scaffold)  # its variates fit only sparse
    assert {c.momentum for c in scaffold} == {params["momentum"]}  # like every other method


def test_each_search_varies_only_its_own_settings_on_the_first_non_iid_sharding():
    params = notebook_params("06")
    expected = {
        experiments.FEDAVGM_SEARCH: {
            (lr, beta)
            for lr in params["fedavgm_search_server_lrs"]
            for beta in params["fedavgm_search_server_momentums"]
        },
        experiments.FEDPROX_SEARCH: {(mu,) for mu in params["fedprox_search_mus"]},
        experiments.TIES_SEARCH: {
            (p, lr) for p in params["ties_search_densities"] for lr in params["ties_search_server_lrs"]
        },
    }
    for experiment, settings in expected.items():
        fields = list(experiments.SEARCHED[experiments.EXPERIMENTS[experiment].search].values())
        searched = configs_of(experiment, params)
        assert {tuple(getattr(c, f) for f in fields) for c in searched} == settings
        assert {(c.classes_per_client, c.seed, c.rounds, c.evaluate_test) for c in searched} == {
            (params["remedy_classes_per_client"][0], 0, params["remedy_search_rounds"], False)
        }
        assert {c.finetune.is_sparse for c in searched} == {False}


def test_the_searches_choices_become_the_methods_of_the_grid(workspace, monkeypatch):
    params = notebook_params("06")
    params.update(fedavgm_server_lr=None, fedavgm_server_momentum=None, prox_mu=None, ties_density=None)
    params["ties_server_lr"] = None
    # the last setting of each grid is best on validation
    search_with(monkeypatch, lambda c: c.server_lr + c.server_momentum + c.prox_mu + c.ties_density)
    for experiment in (experiments.FEDAVGM_SEARCH, experiments.FEDPROX_SEARCH, experiments.TIES_SEARCH):
        experiments.run(workspace, None, experiment, params)
    grid = configs_of(experiments.REMEDIES, params)
    fedavgm = {(c.server_lr, c.server_momentum) for c in grid if c.server_momentum > 0}
    assert fedavgm == {
        (params["fedavgm_search_server_lrs"][-1], params["fedavgm_search_server_momentums"][-1])
    }
    assert {c.prox_mu for c in grid if c.algorithm == "fedprox"} == {params["fedprox_search_mus"][-1]}
    ties = {(c.ties_density, c.server_lr) for c in grid if c.merge_rule == "ties"}
    assert ties == {(params["ties_search_densities"][-1], params["ties_search_server_lrs"][-1])}
    stored = workspace.load_hparams()
    assert (
        stored["fedprox_prox_mu"] == params["prox_mu"]
        and stored["ties_server_lr"] == params["ties_server_lr"]
    )


def test_fedavgm_at_plain_fedavgs_server_step_is_fedavg_one_run():
    params = {**notebook_params("06"), "fedavgm_server_lr": 1.0, "fedavgm_server_momentum": 0.0}
    grid = configs_of(experiments.REMEDIES, params)
    assert len(grid) == len(set(grid))
    non_iid = [c for c in grid if c.sharding == "non_iid"]
    methods = len(experiments.REMEDY_METHODS) - 1  # FedAvgM is FedAvg here
    assert len(non_iid) == methods * len(params["remedy_classes_per_client"]) * len(params["seeds"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prox_mu": -0.1}, "prox_mu=-0.1 is out of range; it must be in [0, inf)"),
        ({"ties_density": 1.5}, "ties_density=1.5 is out of range; it must be in (0, 1]"),
        ({"ties_density": 0.0}, "ties_density=0 is out of range; it must be in (0, 1]"),
        ({"methods": ["fedsgd"]}, "methods[0]='fedsgd' is not allowed; choose one of ['fedavg', 'fedavgm'"),
        ({"fedavgm_server_momentum": 1.0}, "fedavgm_server_momentum=1 is out of range; it must be in [0, 1)"),
        ({"ties_server_lr": 0.0}, "ties_server_lr=0 is out of range; it must be in (0, inf)"),
        ({"fedprox_search_mus": [-1.0]}, "fedprox_search_mus[0]=-1 is out of range; it must be in [0, inf)"),
        (
            {"ties_search_densities": [1.2]},
            "ties_search_densities[0]=1.2 is out of range; it must be in (0, 1]",
        ),
        ({"remedy_search_rounds": 0}, "remedy_search_rounds=0 is too small; it must be >= 1"),
    ],
)
def test_bad_remedy_parameters_are_refused_by_name_before_anything_runs(bad, message):
    params = notebook_params("06")
    with pytest.raises(ConfigError, match=re.escape(message)):
        experiments.check_notebook("06", {**params, **bad})
