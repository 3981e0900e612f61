"""FedProx and SCAFFOLD: the clients' gradient terms (SparseSGDM), the control variates, and the runs."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch

from fedta_utils import fedavg
from fedta_utils.checks import ConfigError
from fedta_utils.fedavg import ControlVariates, FedAvgConfig, run_fedavg, server_update
from fedta_utils.optim import SparseSGDM
from fedta_utils.prepare import FineTuneSpec

TINY = dict(
    dataset="synthetic",
    model="tiny_vit",
    num_clients=6,
    participation=0.5,
    local_steps=2,
    rounds=2,
    batch_size=16,
    lr=0.05,
    eval_points=1,
    evaluate_test=False,
)

SPARSE = FineTuneSpec(
    head="ridge",
    ridge_lambda=1e-3,
    mask_rule="least_sensitive",
    sparsity=0.9,
    calibration_rounds=1,
    calibration_samples=60,
)


@contextlib.contextmanager
def open_fedavg(ws, data, config):
    """A FedAvgRun between rounds, its run folder locked as during training."""
    run = ws.run(config.run_name(), config.to_dict())
    with run:
        yield fedavg.FedAvgRun(ws, data, config, run, shards=config.shards(data), eval_batch_size=256)


def weights_after_round(ws, data, config) -> torch.Tensor:
    with open_fedavg(ws, data, config) as fed:
        fed.round(0)
        return fed.global_weights.clone()


# ---------------------------------------------------------------------- equal to FedAvg where they must be


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(workspace, small_data):
    plain = weights_after_round(workspace, small_data, FedAvgConfig(**TINY))
    prox = weights_after_round(workspace, small_data, FedAvgConfig(**TINY, algorithm="fedprox", prox_mu=0.0))
    assert torch.equal(plain, prox)


def test_scaffolds_first_round_is_fedavgs(workspace, small_data):
    """Zero control variates and the same aggregation weights: round 1 of SCAFFOLD is round 1 of FedAvg."""
    plain = weights_after_round(workspace, small_data, FedAvgConfig(**TINY))
    scaffold = weights_after_round(workspace, small_data, FedAvgConfig(**TINY, algorithm="scaffold"))
    assert torch.equal(plain, scaffold)


def test_fedprox_pulls_the_clients_towards_the_global_weights(workspace, small_data):
    plain = weights_after_round(workspace, small_data, FedAvgConfig(**TINY))
    prox = weights_after_round(workspace, small_data, FedAvgConfig(**TINY, algorithm="fedprox", prox_mu=10.0))
    with open_fedavg(workspace, small_data, FedAvgConfig(**TINY)) as fed:
        start = fed.global_weights.clone()
    assert torch.linalg.vector_norm(prox - start) < torch.linalg.vector_norm(plain - start)


def test_the_optimizer_adds_the_proximal_and_correction_terms_after_the_clip_before_decay_and_momentum():
    """Steps of SparseSGDM with the terms equal SGD on clip(g) + mu (w - w_t) + (c - c_i): three steps, so
    that momentum has a history, and gradients the clip scales down."""
    anchor = torch.tensor([0.0, -1.0, 1.0])
    correction = torch.tensor([0.1, 0.2, -0.3])
    mine = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    reference = torch.nn.Parameter(mine.detach().clone())
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    terms = SparseSGDM(
        [mine], **options, max_grad_norm=1.0, prox_mu=0.5, anchors=[anchor], corrections=[correction]
    )
    sgd = torch.optim.SGD([reference], **options)
    for gradient in ([4.0, -1.0, 2.0], [0.3, 0.1, -0.2], [-3.0, 2.0, 0.5]):
        mine.grad = torch.tensor(gradient)
        reference.grad = torch.tensor(gradient)
        torch.nn.utils.clip_grad_norm_([reference], 1.0)
        reference.grad += 0.5 * (reference.detach() - anchor) + correction
        terms.step()
        sgd.step()
    torch.testing.assert_close(mine.detach(), reference.detach(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- SCAFFOLD's state


def test_scaffolds_server_variate_moves_by_one_over_all_clients_not_the_rounds():
    control = ControlVariates(size=2, num_clients=4)
    control.client_done(0, torch.tensor([-1.0, 0.0]), steps_lr=0.5)  # c_0+ = 0 - 0 + (1, 0) / 0.5
    control.client_done(3, torch.tensor([0.0, 2.0]), steps_lr=0.5)  # c_3+ = (0, -4)
    assert torch.equal(control.server, torch.zeros(2))  # c waits for the round's end
    control.round_done()
    torch.testing.assert_close(control.server, torch.tensor([2.0, -4.0]) / 4)  # N = 4, not the 2 of the round
    torch.testing.assert_close(control.correction(0), control.server - torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(control.correction(1), control.server)  # a client not seen yet: c_i = 0


def test_a_dense_scaffold_run_too_large_for_the_host_is_refused_before_training():
    with pytest.raises(ConfigError, match="algorithm='scaffold' keeps 8.8 GB of control variates"):
        fedavg.check_scaffold_state(21_700_000, 100)  # ViT-S/16 dense, K = 100
    fedavg.check_scaffold_state(2_200_000, 100)  # sparse at 0.9: 0.89 GB


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"algorithm": "ditto"},
            "algorithm='ditto' is not allowed; choose one of ['fedavg', 'fedprox', 'scaffold']",
        ),
        ({"algorithm": "fedprox", "prox_mu": -0.1}, "prox_mu=-0.1 is out of range; it must be in [0, inf)"),
        ({"prox_mu": 0.1}, "prox_mu=0.1 applies to algorithm='fedprox' only"),
    ],
)
def test_bad_client_algorithm_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FedAvgConfig(**{**TINY, **bad})


def test_a_killed_scaffold_run_resumes_bit_identically(tmp_path, small_data, monkeypatch):
    from fedta_utils.workspace import setup_workspace

    # sparse: SCAFFOLD's variates over the trainable entries only; client momentum as in notebook 06
    config = FedAvgConfig(**{**TINY, "rounds": 3, "eval_points": 2}, algorithm="scaffold", finetune=SPARSE)
    reference = run_fedavg(
        setup_workspace("smoke", tmp_path / "a", device="cpu", download=False),
        small_data,
        config,
        progress=False,
    )
    ws = setup_workspace("smoke", tmp_path / "b", device="cpu", download=False)
    real_round = fedavg.FedAvgRun.round

    def killed_after_two(self, round_index):
        if round_index == 2:
            raise KeyboardInterrupt
        return real_round(self, round_index)

    monkeypatch.setattr(fedavg.FedAvgRun, "round", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_fedavg(ws, small_data, config, progress=False, checkpoint_every=1)
    monkeypatch.setattr(fedavg.FedAvgRun, "round", real_round)
    resumed = run_fedavg(ws, small_data, config, progress=False, checkpoint_every=1)
    assert (resumed.run.dir / "metrics.csv").read_bytes() == (reference.run.dir / "metrics.csv").read_bytes()


# ---------------------------------------------------------------- least squares with heterogeneous clients


def quadratic_clients(seed: int = 0):
    """Four clients, f_k(w) = 1/2 ||A_k w - b_k||^2 with different optima; the global minimiser of
    sum_k f_k in closed form."""
    generator = torch.Generator().manual_seed(seed)
    matrices = [torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(4)]
    targets = [torch.randn(6, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    gram = sum(a.T @ a for a in matrices)
    minimiser = torch.linalg.solve(gram, sum(a.T @ b for a, b in zip(matrices, targets)))
    return matrices, targets, minimiser


def federated_fixed_point(
    algorithm: str,
    *,
    prox_mu=0.0,
    momentum=0.0,
    steps=fedavg.effective_steps,
    rounds=300,
    local_steps=5,
    lr=0.02,
) -> torch.Tensor:
    """Full participation, equal weights, SGD clients (the package's SparseSGDM with its client terms, the
    package's ControlVariates, `steps` (J, momentum) -> S of c_i+, and server_update); the global weights
    after `rounds` rounds."""
    matrices, targets, _ = quadratic_clients()
    global_weights = torch.zeros(3, dtype=torch.float64)
    control = ControlVariates(3, len(matrices))
    control.server = control.server.double()
    control.round_change = control.round_change.double()
    for _ in range(rounds):
        delta_sum = torch.zeros_like(global_weights)
        for k, (a, b) in enumerate(zip(matrices, targets)):
            w = torch.nn.Parameter(global_weights.clone())
            terms = {"prox_mu": prox_mu, "anchors": [global_weights]} if algorithm == "fedprox" else {}
            if algorithm == "scaffold":
                terms = {"corrections": [control.correction(k).to(torch.float64)]}
            optimizer = SparseSGDM([w], lr=lr, momentum=momentum, **terms)
            for _ in range(local_steps):
                optimizer.zero_grad()
                (0.5 * (a @ w - b).square().sum()).backward()
                optimizer.step()
            delta = w.detach() - global_weights
            delta_sum += delta
            if algorithm == "scaffold":
                control.client_done(k, delta, steps_lr=steps(local_steps, momentum) * lr)
        control.round_done()
        server_update(global_weights, delta_sum / len(matrices))
    return global_weights


def test_scaffold_reaches_the_global_minimiser_where_fedavg_drifts_and_fedprox_moves_towards_it():
    _, _, minimiser = quadratic_clients()
    distance = {}
    for name, options in {
        "fedavg": {},
        "fedprox 1": {"prox_mu": 1.0},
        "fedprox 10": {"prox_mu": 10.0},
        "scaffold": {},
    }.items():
        algorithm = name.split()[0]
        distance[name] = torch.linalg.vector_norm(
            federated_fixed_point(algorithm, **options) - minimiser
        ).item()
    assert distance["fedavg"] > 1e-2  # several local steps on different optima: a biased fixed point
    assert distance["scaffold"] < 1e-8  # corrected: the global minimiser, up to float64 round-off
    assert distance["fedavg"] > distance["fedprox 1"] > distance["fedprox 10"]  # mu pulls it towards it


def test_scaffold_with_client_momentum_reaches_the_minimiser_when_its_variates_count_effective_steps():
    """With momentum 0.9, J steps move effective_steps(J, 0.9) = 2.6 J times lr * g (J = 5): option II's
    J * lr makes the variates diverge, the effective steps keep SCAFFOLD exact."""
    _, _, minimiser = quadratic_clients()
    counted = federated_fixed_point("scaffold", momentum=0.9)
    assert torch.linalg.vector_norm(counted - minimiser) < 1e-8
    naive = federated_fixed_point("scaffold", momentum=0.9, steps=lambda j, beta: j)
    assert not torch.linalg.vector_norm(naive - minimiser) < 1.0  # diverged (inf or nan)
    assert fedavg.effective_steps(4, 0.0) == 4 and fedavg.effective_steps(2, 0.9) == 1 + 1.9


# ------------------------------------------------------------------------ the server's merge rules in a run


def test_the_mean_merge_is_fedavgs_weighted_average(workspace, small_data):
    """FedAvgRun's round merges with aggregation.MeanMerge: the same step as sum n_k d_k / sum n_k."""
    config = FedAvgConfig(**TINY)
    deltas = []
    real_update = fedavg.client_update

    def recorded(*args, **kwargs):
        update = real_update(*args, **kwargs)
        deltas.append(update.delta.clone())
        return update

    with open_fedavg(workspace, small_data, config) as fed:
        start = fed.global_weights.clone()
        fed_round = fed.round
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fedavg, "client_update", recorded)
            fed_round(0)
        clients = fedavg.sample_clients(config.seed, 0, config.num_clients, config.participation)
        sizes = [len(fed.shards[c]) for c in clients]
        step = fed.global_weights - start
    expected = sum(n * d for n, d in zip(sizes, deltas)) / sum(sizes)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("merge", [{"merge_rule": "ties", "ties_density": 0.5}, {"merge_rule": "fisher"}])
def test_a_run_merges_with_ties_or_the_fisher_and_logs_its_step(workspace, small_data, merge):
    result = run_fedavg(workspace, small_data, FedAvgConfig(**TINY, **merge), progress=False)
    plain = run_fedavg(workspace, small_data, FedAvgConfig(**TINY), progress=False)
    assert result.run.dir != plain.run.dir and merge["merge_rule"] in result.run.dir.name
    steps = result.metrics["avg_delta_norm"]
    assert steps.notna().all() and (steps > 0).all()
    assert not steps.equals(plain.metrics["avg_delta_norm"])  # another rule, another step


def test_a_sparse_ties_round_changes_at_most_ceil_p_times_the_trainable_entries(workspace, small_data):
    """One client per round: TIES keeps the top ceil(p * trainable) entries of its delta, and the server
    moves exactly those, none outside the mask."""
    one_client = {**TINY, "participation": 1 / 6}
    config = FedAvgConfig(**one_client, merge_rule="ties", ties_density=0.3, finetune=SPARSE)
    with open_fedavg(workspace, small_data, config) as fed:
        start = fed.global_weights.clone()
        fed.round(0)
        moved = fed.global_weights != start
    trainable = torch.zeros_like(moved)
    trainable[fed.entries] = True
    assert not (moved & ~trainable).any()
    assert 0 < moved.sum() <= math.ceil(0.3 * fed.entries_sent)


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"merge_rule": "median"},
            "merge_rule='median' is not allowed; choose one of ['mean', 'ties', 'fisher']",
        ),
        ({"ties_density": 0.0}, "ties_density=0 is out of range; it must be in (0, 1]"),
        ({"merge_fisher_samples": 0}, "merge_fisher_samples=0 is too small; it must be >= 1"),
    ],
)
def test_bad_merge_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FedAvgConfig(**{**TINY, **bad})


def test_a_config_names_only_the_client_and_merge_settings_that_apply():
    plain = FedAvgConfig(**TINY).to_dict()
    assert {"algorithm", "prox_mu", "merge_rule", "ties_density", "merge_fisher_samples"}.isdisjoint(plain)
    assert FedAvgConfig(**TINY, ties_density=0.5).to_dict() == plain  # a TIES setting without TIES
    ties = FedAvgConfig(**TINY, merge_rule="ties", ties_density=0.5).to_dict()
    assert ties["ties_density"] == 0.5 and "merge_fisher_samples" not in ties
    prox = FedAvgConfig(**TINY, algorithm="fedprox", prox_mu=0.1).to_dict()
    assert (prox["algorithm"], prox["prox_mu"]) == ("fedprox", 0.1)


def test_the_logged_traffic_counts_scaffolds_variates_and_the_fisher_merges_fishers(workspace, small_data):
    traffic = {}
    for name, fields in {
        "fedavg": {},
        "scaffold": {"algorithm": "scaffold"},
        "fisher": {"merge_rule": "fisher"},
    }.items():
        with open_fedavg(workspace, small_data, FedAvgConfig(**TINY, **fields)) as fed:
            traffic[name] = fed.traffic(3)
    one_way = traffic["fedavg"]["bytes_up"]
    assert traffic["fedavg"]["bytes_down"] == one_way == 3 * 4 * fed.entries_sent
    assert traffic["scaffold"] == {
        "bytes_down": 2 * one_way,
        "bytes_up": 2 * one_way,
    }  # c down, c_i+ - c_i up
    assert traffic["fisher"] == {"bytes_down": one_way, "bytes_up": 2 * one_way}  # F_k up
