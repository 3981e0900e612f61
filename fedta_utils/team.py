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
from .runs import read_metrics
from .training import eval_steps

WAIT_POLL = 5.0  # seconds between two looks at the shared folder
# experiment -> run folders of this process's worker grids not complete when last listed (figures mark them)
PENDING: dict[str, list[str]] = {}
CIFAR_TRAIN, CIFAR_TEST, CLASSES = 50_000, 10_000, 100


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
    loads, owners = [0.0] * workers, [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        worker = loads.index(min(loads))
        owners[index], loads[worker] = worker + 1, loads[worker] + costs[index]
    return owners


# --------------------------------------------------------------------------- what a run costs


def split_sizes(config, params: dict) -> tuple[int, int, int, int]:
    """(train, validation, test (0 when the run never tests), subset evaluation) images of a config."""
    synthetic = config.dataset != "cifar100"
    full = params.get("synthetic_train_size", CIFAR_TRAIN) if synthetic else CIFAR_TRAIN
    test = params.get("synthetic_test_size", CIFAR_TEST) if synthetic else CIFAR_TEST
    val, test = round(full * params.get("val_fraction", 0.1)), test if config.evaluate_test else 0
    subset = max(1, config.eval_subset // CLASSES) * CLASSES  # DataBundle.eval_subset
    return full - val, val, test, min(val, subset) + min(test, subset)


def run_work(config, params: dict, head_only: bool = False) -> dict:
    """Images one run trains on and evaluates, and the per-sample Fisher gradients it computes."""
    train, val, test, subset = split_sizes(config, params)
    spec, fisher = config.finetune, 0
    if spec.is_sparse and spec.mask_rule in ("least_sensitive", "most_sensitive"):
        clients = config.num_clients if isinstance(config, FedAvgConfig) else 1
        fisher = spec.calibration_rounds * clients * -(-spec.calibration_samples // clients)
    if head_only:
        return {"train": 0, "eval": val + test, "fisher": fisher}
    if isinstance(config, FedAvgConfig):
        batch = min(config.batch_size, train // config.num_clients)
        trained, steps = config.rounds * config.clients_per_round * config.local_steps * batch, config.rounds
    else:
        trained, steps = config.epochs * train, config.epochs * -(-train // config.batch_size)
    evaluated = (len(eval_steps(steps, config.eval_points)) - 1) * subset + val + test  # subsets, then full
    return {"train": trained, "eval": evaluated, "fisher": fisher}


# --------------------------------------------------------------------------- a share of a stage


def status(runs: list, owners: list[int]) -> pd.DataFrame:
    """One row per run of a grid: its folder, worker, state (complete, partial, not started) and, for a
    partial run, its newest metrics row."""
    rows = []
    for run, owner in zip(runs, owners):
        partial = not run.is_complete and (run.dir / "metrics.csv").is_file()
        newest = read_metrics(run.dir).tail(1).to_dict("records") if partial else []
        state = "complete" if run.is_complete else "partial" if partial else "not started"
        rows.append({"run": run.dir.name, "worker": owner, "state": state, **(newest[0] if newest else {})})
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


def run_share(run_one, runs: list, costs: list[float], params: dict, wait: bool, experiment: str):
    """Worker mode of experiments.run_grid: run_one(i) for this worker's share of the grid's `runs`, then,
    with `wait`, wait for every other share and return every result; without, print the grid's status
    (once a first run is complete, so there is something to plot) and return the complete results."""
    me, workers = parse_worker(params["worker"])
    owners = assign(costs, workers)
    limit = params.get("wait_limit", 3600)
    for index, (run, owner) in enumerate(zip(runs, owners)):
        if owner == me:
            print(f"[worker {me}/{workers}] {experiment}: {run.dir.name}", flush=True)
            run_one(index)
    if wait:
        wait_for(
            lambda: ", ".join(
                f"{r.dir.name} (worker {o}/{workers})" for r, o in zip(runs, owners) if not r.is_complete
            ),
            limit,
        )
    else:
        wait_for(lambda: "" if any(r.is_complete for r in runs) else "a first complete run", limit)
        print(status(runs, owners).to_string(index=False), flush=True)
        PENDING[experiment] = [r.dir.name for r in runs if not r.is_complete]
    return [run_one(index) for index, run in enumerate(runs) if run.is_complete]
