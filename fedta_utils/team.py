"""Several workers on one results folder: the shares of a grid, their cost, waiting for inputs.

    worker: str = "2/3"     # a notebook parameter (or pipeline --worker 2/3): worker 2 of 3

Worker I of N runs its own share of every stage of a grid. Shares come from the grid alone (each
run's cost is what the dry-run counts: trained plus evaluated images; the costliest run goes first
to the least-loaded worker), so workers need no coordination beyond the shared folder. That matters
on Google Drive, where a file written on one machine reaches another only after Drive syncs, so a
lock cannot arbitrate between machines quickly; the run lock stays as the safety net for two
workers given the same share. A stage whose results a later one needs (a search's choice, the
step-0 heads) ends with a wait for the other shares; a waiting worker prints what it waits for and
which worker owes it, and stops after `wait_limit` seconds with that message.
"""

from __future__ import annotations

import re
import time

import pandas as pd

from .checks import ConfigError
from .fedavg import FedAvgConfig
from .masks import SENSITIVITY_RULES
from .runs import read_metrics
from .training import eval_steps

WAIT_POLL = 5.0  # seconds between two looks at the shared folder
# experiment -> run folders of this process's worker grids not complete when last listed (figures mark them)
PENDING: dict[str, list[str]] = {}
CIFAR_TRAIN = 50_000
CIFAR_TEST = 10_000
CLASSES = 100


class WaitTimeout(RuntimeError):
    """A worker's inputs did not appear within its wait_limit."""


def parse_worker(worker) -> tuple[int, int] | None:
    """'I/N' -> (I, N), worker I of N counted from 1; '' or None -> None (one process runs everything)."""
    if worker in (None, ""):
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", str(worker).strip())
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ConfigError(
            f"worker={worker!r} is not allowed; write 'I/N' with 1 <= I <= N (e.g. '1/3', "
            "worker 1 of 3), or '' for a single process"
        )
    return int(match[1]), int(match[2])


def assign(costs: list[float], workers: int) -> list[int]:
    """The worker (1..N) of each run: costliest first, each to the least-loaded worker (ties: grid order,
    lowest worker), so the largest and smallest shares differ by at most the costliest run."""
    loads = [0.0] * workers
    owners = [0] * len(costs)
    costliest_first = sorted(range(len(costs)), key=lambda i: -costs[i])  # a stable sort: ties in grid order
    for index in costliest_first:
        worker = loads.index(min(loads))  # the first of the least-loaded: the lowest worker
        owners[index] = worker + 1
        loads[worker] += costs[index]
    return owners


# --------------------------------------------------------------------------- what a run costs


def split_sizes(config, params: dict) -> tuple[int, int, int, int]:
    """(train, validation, test (0 when the run never tests), subset evaluation) images of a config; the
    subset evaluation holds the whole validation split under full_val_curve."""
    full = CIFAR_TRAIN
    test = CIFAR_TEST
    if config.dataset != "cifar100":
        full = params.get("synthetic_train_size", CIFAR_TRAIN)
        test = params.get("synthetic_test_size", CIFAR_TEST)
    if not config.evaluate_test:
        test = 0
    val = round(full * params.get("val_fraction", 0.1))
    per_class = max(1, config.eval_subset // CLASSES)  # DataBundle.eval_subset: whole classes, at least one
    subset = per_class * CLASSES
    val_subset = val if config.full_val_curve else min(val, subset)
    return full - val, val, test, val_subset + min(test, subset)


def fisher_samples(config) -> int:
    """Per-sample Fisher gradients a run computes: only a sensitivity mask rule scores entries, with
    calibration_samples per calibration round, split over the clients (each rounds its share up)."""
    spec = config.finetune
    if spec.mask_rule not in SENSITIVITY_RULES:
        return 0
    clients = config.num_clients if isinstance(config, FedAvgConfig) else 1
    per_client = -(-spec.calibration_samples // clients)  # ceiling division
    return spec.calibration_rounds * clients * per_client


def run_work(config, params: dict, head_only: bool = False) -> dict:
    """Images one run trains on and evaluates, and the per-sample Fisher gradients it computes (its mask's
    calibration, the Fisher merge's client Fishers)."""
    train, val, test, subset = split_sizes(config, params)
    fisher = fisher_samples(config)
    if head_only:
        return {"train": 0, "eval": val + test, "fisher": fisher}
    if isinstance(config, FedAvgConfig):
        batch = min(config.batch_size, train // config.num_clients)  # a client's shard may be smaller
        trained = config.rounds * config.clients_per_round * config.local_steps * batch
        steps = config.rounds
        if config.merge_rule == "fisher":  # every client's Fisher at its end weights, every round
            per_client = min(config.merge_fisher_samples, train // config.num_clients)
            fisher += config.rounds * config.clients_per_round * per_client
    else:
        trained = config.epochs * train
        steps = config.epochs * -(-train // config.batch_size)  # the last batch of an epoch may be short
    evaluations = len(eval_steps(steps, config.eval_points))
    evaluated = (evaluations - 1) * subset + val + test  # subsets, then the full splits at the end
    return {"train": trained, "eval": evaluated, "fisher": fisher}


# --------------------------------------------------------------------------- a share of a stage


def status(runs: list, owners: list[int]) -> pd.DataFrame:
    """One row per run of a grid: its folder, worker, state (complete, partial, not started) and, for a
    partial run, its newest metrics row."""
    rows = []
    for run, owner in zip(runs, owners):
        row = {"run": run.dir.name, "worker": owner, "state": "not started"}
        if run.is_complete:
            row["state"] = "complete"
        elif (run.dir / "metrics.csv").is_file():
            row["state"] = "partial"
            newest = read_metrics(run.dir).tail(1).to_dict("records")
            if newest:  # a metrics file may hold only its header
                row.update(newest[0])
        rows.append(row)
    return pd.DataFrame(rows)


def wait_for(missing, limit: float, poll: float = WAIT_POLL) -> None:
    """Return once missing() (a description of what is not there yet, '' when all is) is empty; stop
    with WaitTimeout after `limit` seconds."""
    deadline = time.monotonic() + limit
    while what := missing():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"gave up after waiting {limit:g} s (wait_limit) for {what}")
        print(f"[worker] waiting for {what}", flush=True)
        time.sleep(poll)


def run_share(run_one, runs: list, costs: list[float], params: dict, *, wait: bool, experiment: str):
    """Worker mode of experiments.run_grid: run_one(i) for this worker's share of the grid's `runs`, then,
    with `wait`, wait for every other share and return every result; without, print the grid's status
    (once a first run is complete, so there is something to plot) and return the complete results."""
    me, workers = parse_worker(params["worker"])
    owners = assign(costs, workers)
    limit = params.get("wait_limit", 3600)

    def owed_runs() -> str:
        """The runs not complete yet, each with the worker that owes it ('' once every run is)."""
        owed = [f"{r.dir.name} (worker {o}/{workers})" for r, o in zip(runs, owners) if not r.is_complete]
        return ", ".join(owed)

    for index, owner in enumerate(owners):
        if owner == me:
            print(f"[worker {me}/{workers}] {experiment}: {runs[index].dir.name}", flush=True)
            run_one(index)
    if wait:
        wait_for(owed_runs, limit)
    else:
        wait_for(lambda: "" if any(r.is_complete for r in runs) else "a first complete run", limit)
        print(status(runs, owners).to_string(index=False), flush=True)
        PENDING[experiment] = [r.dir.name for r in runs if not r.is_complete]
    return [run_one(index) for index, run in enumerate(runs) if run.is_complete]
