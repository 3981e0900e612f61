"""Run the numbered notebooks in order with papermill, or count what they would run.

    python -m fedta_utils.pipeline --profile smoke
    python -m fedta_utils.pipeline --profile full --only 02 03 -p seeds "[0, 1]"
    python -m fedta_utils.pipeline --profile full --dry-run

Executed copies go to <results_dir>/<profile>/notebooks/. Parameters come from, in increasing
priority: the notebook's parameters cell (the full profile), the profile's parameters file
(notebooks/smoke.yaml, the file `papermill -f` reads), and `-p NAME VALUE`. A -p name that no
selected notebook declares is an error, as is an unknown notebook in --only. The first failing
notebook stops the pipeline with its failing cell and error printed.

--dry-run builds every grid with the very functions the notebooks call (experiments.EXPERIMENTS)
from the same parameters, counts the images each run trains on, evaluates and scores, measures what
one of each costs on this device in a few seconds, and prints the hours, and the gigabytes the runs
write to the results folder, checkpoints apart (their number follows from the hours when they are
written by wall time). Left out of the hours, since they cost little next to training: FedAvg's
per-round overhead (see the benchmark), checkpoint writes, data loading. A run two notebooks name
is counted once, and so is a step-0 head shared through the head cache.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from . import experiments
from .checks import ConfigError, check_choice
from .fedavg import FedAvgConfig, check_scaffold_state
from .models import build_model, head_parameter_names
from .prepare import eligible_names
from .team import parse_worker, run_work, split_sizes
from .workspace import NOTEBOOK_DIR, PROFILES, declared_parameters, discover_notebooks, profile_values

KERNEL = "python3"
# --slurm: submitit's options (cluster 'local' runs the jobs as local processes, for tests).
SLURM_DEFAULTS = {"cluster": "slurm", "timeout_min": 240, "gpus_per_node": 1}
# The kernel's one start-up warning says it talks over TCP without encryption: papermill reaches it on
# this machine's loopback interface, so nothing leaves the machine (README, "Running from a terminal").
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]
KERNEL_DIED = "Kernel died before replying to kernel_info"  # jupyter_client's words for a failed start
KERNEL_START_TRIES = 3
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")
SMALL_IMG_SIZE = 160  # the cheaper input size the dry-run also prices
CHECKPOINT_OVERHEAD = 8_000  # bytes of a checkpoint besides its tensors: the RNG state, metrics rows, zip
# What a config's head_cache reads of a workspace: a step-0 head is named by its cache path under any root.
DRY_RUN_WORKSPACE = SimpleNamespace(root="dry-run", weights_path=None)


def parse_value(text: str):
    """A -p value as a Python literal if it is one (1, 0.5, [0, 1], True, None), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(path: Path, profile: str, results_dir: Path, overrides: dict) -> dict:
    """What papermill injects into one notebook: the profile's values and overrides it declares."""
    values = {"profile": profile, "results_dir": str(results_dir), **profile_values(profile), **overrides}
    return {name: value for name, value in values.items() if name in declared_parameters(path)}


def checked_selection(profile: str, only: list[str] | None, overrides: dict, notebook_dir: Path) -> dict:
    """The notebooks of `notebook_dir` that --only selects, once the profile and every -p name are checked
    (before anything runs)."""
    check_choice("profile", profile, PROFILES)
    selected = discover_notebooks(notebook_dir)
    if only:
        keys = [key[:2] for key in only]  # '02' or '02_fedavg_iid'
        unknown = [key for key in keys if key not in selected]
        if unknown:
            raise ConfigError(f"--only {unknown}: no such notebook; available: {sorted(selected)}")
        selected = {key: path for key, path in selected.items() if key in keys}
    if not selected:
        raise ConfigError(f"no numbered notebooks found in {notebook_dir}")
    # Every -p name must be a parameter of at least one selected notebook.
    declared = set().union(*(declared_parameters(path) for path in selected.values()))
    unknown = sorted(set(overrides) - declared)
    if unknown:
        raise ConfigError(
            f"-p {unknown[0]}: no selected notebook declares a parameter of that name; "
            f"declared: {sorted(declared)}"
        )
    return selected


def notebook_output_dir(results_dir: Path, profile: str, worker: str) -> Path:
    """<results_dir>/<profile>/notebooks (a worker's: its own folder in it), created now, so that a results
    folder one cannot write to stops the pipeline before its first notebook."""
    output_dir = results_dir / profile / "notebooks"
    if worker:
        output_dir = output_dir / f"worker-{worker.replace('/', '-of-')}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"results_dir={str(results_dir)!r} is not writable ({error}); choose a folder you can write to"
        ) from error
    return output_dir


def run_pipeline(
    profile: str,
    only: list[str] | None = None,
    results_dir: str | Path = "results",
    overrides: dict | None = None,
    *,
    notebook_dir: Path = NOTEBOOK_DIR,
    worker: str = "",
):
    """Execute the selected notebooks in order; returns one record per notebook with its wall time.
    `worker` ('I/N') reaches every notebook that declares it (the grid notebooks)."""
    from papermill.exceptions import PapermillExecutionError

    overrides = overrides or {}
    selected = checked_selection(profile, only, overrides, notebook_dir)
    if parse_worker(worker):  # a worker runs the grid notebooks; the final pass runs the others
        overrides = {**overrides, "worker": worker}
        selected = {key: path for key, path in selected.items() if "worker" in declared_parameters(path)}
    results_dir = Path(results_dir).resolve()
    output_dir = notebook_output_dir(results_dir, profile, worker)
    records = []
    for path in selected.values():
        parameters = notebook_parameters(path, profile, results_dir, overrides)
        print(f"[pipeline] {path.name} ({profile}) with {parameters}", flush=True)
        started = time.perf_counter()
        try:
            execute_notebook(path, output_dir / path.name, parameters)
        except PapermillExecutionError as error:
            raise NotebookFailed(path.name, error) from None
        records.append({"notebook": path.name, "seconds": time.perf_counter() - started})
        print(f"[pipeline] {path.name} done in {records[-1]['seconds']:.1f} s", flush=True)
    return records


def execute_notebook(path: Path, output: Path, parameters: dict) -> None:
    """One notebook through papermill, its kernel started again if it died before it ran anything.

    jupyter_client picks a kernel's ports in the parent process and the kernel binds them a moment
    later, so two workers on one machine that start kernels at the same moment can be handed the same
    port; the second kernel then dies at start-up ("Address already in use"), before any cell ran.
    """
    import papermill

    for attempt in range(1, KERNEL_START_TRIES + 1):
        try:
            papermill.execute_notebook(
                str(path),
                str(output),
                parameters=parameters,
                kernel_name=KERNEL,
                cwd=str(path.parent.parent),
                progress_bar=False,
                extra_arguments=QUIET_KERNEL,
            )
            return
        except RuntimeError as error:
            if KERNEL_DIED not in str(error) or attempt == KERNEL_START_TRIES:
                raise
            print(
                f"[pipeline] {path.name}: the kernel died at start-up ({error}); starting it again",
                flush=True,
            )


class NotebookFailed(RuntimeError):
    """A notebook raised; the message holds its failing cell and the error."""

    def __init__(self, name: str, error):
        source = "\n".join("    " + line for line in str(error.source).splitlines())
        traceback = ANSI_ESCAPES.sub("", "\n".join(error.traceback[-6:])) if error.traceback else ""
        super().__init__(
            f"{name} failed in cell {error.exec_count}:\n{source}\n{error.ename}: {error.evalue}\n{traceback}"
        )


# --------------------------------------------------------------------------- the dry-run


def notebook_values(path: Path, profile: str, overrides: dict) -> dict:
    """What the notebook sees: its defaults, then the profile's values, then -p overrides."""
    params = {}
    for name, info in declared_parameters(path).items():
        try:
            params[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path.name}: the default of {name} is not a literal") from None
    params.update({k: v for k, v in {**profile_values(profile), **overrides}.items() if k in params})
    return params


def grids(profile: str, only: list[str] | None = None, overrides: dict | None = None) -> list[dict]:
    """Every group of runs the selected notebooks execute: notebook, group, function, configs, params."""
    overrides = overrides or {}
    selected = checked_selection(profile, only, overrides, NOTEBOOK_DIR)
    groups = []
    for key, path in selected.items():
        params = experiments.with_stand_ins(notebook_values(path, profile, overrides))
        for grid in experiments.notebook_grids(key, params):
            groups.append({"notebook": path.stem, "params": params, **grid})
    return groups


WORK = ["train", "eval", "fisher"]  # images trained on, images evaluated, per-sample Fisher gradients


def run_table(groups: list[dict]) -> pd.DataFrame:
    """One row per run: notebook, group, work (WORK), steps (rounds or epochs), the bytes of one of its
    checkpoints (state_bytes) and its checkpoint options (every, minutes).

    A run that an earlier group already names (the same identity, e.g. notebook 03's iid runs at J=4,
    which are notebook 02's runs) is counted once, where it is first named. A step-0 head costs one
    backbone pass over the train split (counted as evaluated images) and another over validation to
    choose its penalty, once per distinct head: runs that share it read it from the head cache.
    """
    rows = []
    heads = set()  # the step-0 heads counted so far
    seen = set()  # the runs counted so far
    for group in groups:
        params = group["params"]
        head_only = group["function"] is experiments.head_only_configs
        for config in group["configs"]:
            key = (head_only, json.dumps(config.to_dict(), sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            work = run_work(config, params, head_only)
            if (head := config.head_cache(DRY_RUN_WORKSPACE, "cpu")) is not None and head not in heads:
                heads.add(head)
                train, val, _, _ = split_sizes(config, params)
                work["eval"] += train + val
            steps = 0 if head_only else getattr(config, "rounds", None) or config.epochs
            rows.append(
                {
                    "notebook": group["notebook"],
                    "group": group["group"],
                    **work,
                    "steps": steps,
                    "state_bytes": 0 if head_only else checkpoint_bytes(config),
                    "prepared_bytes": prepared_bytes(config),
                    "every": params.get("checkpoint_every"),
                    "minutes": params.get("checkpoint_minutes", 15),
                }
            )
    return pd.DataFrame(
        rows,
        columns=["notebook", "group", *WORK, "steps", "state_bytes", "prepared_bytes", "every", "minutes"],
    )


def work_table(groups: list[dict]) -> pd.DataFrame:
    """One row per group: runs, trained / evaluated images, Fisher samples (run_table summed)."""
    runs, rows = run_table(groups), []
    for group in groups:
        mine = runs[(runs["notebook"] == group["notebook"]) & (runs["group"] == group["group"])]
        work = mine[WORK].sum().to_dict()
        rows.append({"notebook": group["notebook"], "group": group["group"], "runs": len(mine), **work})
    return pd.DataFrame(rows, columns=["notebook", "group", "runs", *WORK])


@functools.lru_cache(maxsize=None)
def entry_counts(model: str, img_size: int | None, eligible: str) -> dict:
    """Entries of the model's parameters: all of them, the head's, and those a mask may cover."""
    network = build_model(model, pretrained=False, img_size=img_size)  # 100 classes
    sizes = {name: p.numel() for name, p in network.named_parameters()}
    head = sum(sizes[name] for name in head_parameter_names(network))
    maskable = sum(sizes[name] for name in eligible_names(network, eligible))
    return {"all": sum(sizes.values()), "head": head, "eligible": maskable}


def checkpoint_bytes(config) -> int:
    """The fp32 bytes of one checkpoint of `config`, plus CHECKPOINT_OVERHEAD: a FedAvg run stores w_t
    (and the server velocity under FedAvgM, SCAFFOLD's control variates), a centralized run its weights
    and momentum buffers; a sparse run only their entries its mask lets change, a dense one its whole
    model."""
    spec = config.finetune
    counts = entry_counts(config.model, config.img_size, spec.eligible)
    trainable = counts["all"] - (0 if spec.head == "train" else counts["head"])
    frozen_by_mask = round(spec.sparsity * counts["eligible"]) if spec.is_sparse else 0
    moving = trainable - frozen_by_mask
    if isinstance(config, FedAvgConfig):
        vectors = 2 if config.server_momentum > 0 else 1
        if config.algorithm == "scaffold":  # the server's control variate and one per client
            check_scaffold_state(moving, config.num_clients)  # the dry-run refuses what a run would
            vectors += 1 + config.num_clients
        return CHECKPOINT_OVERHEAD + 4 * vectors * moving
    buffers = moving if config.momentum > 0 else 0
    weights = moving if spec.is_sparse else counts["all"]  # a dense run stores its whole model
    return CHECKPOINT_OVERHEAD + 4 * (weights + buffers)


def prepared_bytes(config) -> int:
    """prepared.pt, which every run writes: its head in fp32 and, for a sparse run, one bit per mask entry."""
    counts = entry_counts(config.model, config.img_size, config.finetune.eligible)
    mask_bits = counts["eligible"] if config.finetune.is_sparse else 0
    return CHECKPOINT_OVERHEAD + 4 * counts["head"] + mask_bits // 8


def checkpoint_count(run, seconds: float) -> int:
    """How many checkpoints a run writes (runs.CheckpointSchedule): none at its last step."""
    before_the_end = max(0, run["steps"] - 1)
    if not pd.isna(run["every"]):  # None or NaN: by wall time
        return int(before_the_end // run["every"])
    by_time = seconds // (run["minutes"] * 60)
    return int(min(before_the_end, by_time))


WRITTEN = ["checkpoints", "checkpoint GB", "written GB"]  # what the runs write to the results folder


def work_seconds(work: pd.DataFrame, seconds: dict) -> pd.Series:
    """Seconds of each row's work (its WORK columns) at the measured `seconds` per unit of each."""
    return sum(work[kind] * seconds[kind] for kind in WORK)


def add_hours(table: pd.DataFrame, groups: list[dict]) -> tuple[dict, str]:
    """Calibrate this device and add each group's hours to `table` (and its hours at the cheaper sizes);
    returns the seconds per unit of work and the text that says where they were measured."""
    from .calibration import unit_seconds  # torch timing code, loaded only when there is work to price

    configs = [c for g in groups for c in g["configs"]]
    models_used = sorted({c.model for c in configs})
    if len(models_used) != 1:  # the calibration measures one model
        raise ConfigError(f"the selected notebooks use the models {models_used}; estimate one at a time")
    model = models_used[0]
    precision = configs[0].precision
    size = configs[0].img_size
    eval_batch = groups[0]["params"].get("eval_batch_size", 256)
    seconds, setup = unit_seconds(model, precision, eval_batch, img_size=size)
    table["hours"] = work_seconds(table, seconds) / 3600
    # DINO ViT-S/16 at its native 224 px is also priced at the cheaper SMALL_IMG_SIZE.
    if model == "dino_vits16" and size in (None, 224):
        measured, _ = unit_seconds(model, precision, eval_batch, img_size=SMALL_IMG_SIZE)
        table[f"hours at {SMALL_IMG_SIZE} px"] = work_seconds(table, measured) / 3600
    return seconds, setup


def add_written(table: pd.DataFrame, runs: pd.DataFrame, seconds: dict) -> pd.DataFrame:
    """`table` with each group's WRITTEN columns: the checkpoints its runs write in the time they take at
    `seconds` per unit of work, and the gigabytes of those and of every run's prepared.pt."""
    run_seconds = work_seconds(runs, seconds)
    runs["checkpoints"] = [checkpoint_count(run, s) for (_, run), s in zip(runs.iterrows(), run_seconds)]
    runs["checkpoint GB"] = runs["checkpoints"] * runs["state_bytes"] / 1e9
    runs["written GB"] = runs["checkpoint GB"] + runs["prepared_bytes"] / 1e9
    written = runs.groupby(["notebook", "group"], sort=False)[WRITTEN].sum()
    return table.merge(written.reset_index(), how="left").fillna(0)


def print_totals(table: pd.DataFrame, kind: str) -> None:
    """One row per notebook and a last one, 'total': the sums of the groups' columns in `table` (runs, work
    in millions of images and thousands of Fisher samples, hours and WRITTEN); then the last lines: runs
    and hours (also at the cheaper sizes), and what the runs write."""
    totals = table.drop(columns="group").groupby("notebook", sort=False).sum()
    totals.loc["total"] = totals.sum()
    shown = totals.copy()
    shown[WORK] = totals[WORK] / [1e6, 1e6, 1e3]
    units = {"train": "trained images (M)", "eval": "evaluated images (M)", "fisher": "Fisher samples (k)"}
    print(shown.rename(columns=units).to_string(float_format="{:,.2f}".format))
    total = totals.loc["total"]
    cheaper_hours = [c for c in total.index if c.startswith("hours at")]
    print(
        f"total: {int(total['runs'])} runs, {total['hours']:,.2f} {kind}-hours on this machine",
        *(f"({total[c]:,.2f} {c})" for c in cheaper_hours),
    )
    print(
        f"written to the results folder: {total['written GB']:,.2f} GB, of which checkpoints "
        f"{total['checkpoint GB']:,.2f} GB ({int(total['checkpoints'])} of them, each emptied, then deleted, "
        "when no longer needed)"
    )


def print_budget(profile: str, only: list[str] | None, overrides: dict) -> pd.DataFrame:
    """Count the runs, calibrate this device, then print per group and notebook the images, the estimated
    hours and the gigabytes written to the results folder (checkpoints apart)."""
    groups = grids(profile, only, overrides)  # bad input stops here, before any compute
    table = work_table(groups)
    runs = run_table(groups)
    if runs.empty:
        print("The selected notebooks train nothing: 0 runs.")
        return table
    started = time.perf_counter()
    seconds, setup = add_hours(table, groups)
    table = add_written(table, runs, seconds)
    kind = "GPU" if "cuda" in setup else "CPU"
    print(f"Estimated cost of the '{profile}' profile in {kind}-hours on this machine: {setup}")
    print(
        f"calibration ({time.perf_counter() - started:.0f} s): seconds per trained image "
        f"{seconds['train']:.2e}, per evaluated image {seconds['eval']:.2e}, per Fisher sample "
        f"{seconds['fisher']:.2e}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.3g}"))
    print_totals(table, kind)
    return table


def argument_parser() -> argparse.ArgumentParser:
    """The command line: what to run and with which parameters, and how a team of workers shares it."""
    parser = argparse.ArgumentParser(
        prog="python -m fedta_utils.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers to run, e.g. 00 01")
    parser.add_argument("--results-dir", default="results", help="root of all results (default: results)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a notebook parameter (a Python literal or a string)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the runs, images and estimated hours per notebook; run nothing",
    )
    group = parser.add_argument_group("running as a team (README, 'Running as a team')")
    group.add_argument("--worker", default="", metavar="I/N", help="run worker I's share of N")
    group.add_argument(
        "--workers", type=int, metavar="N", help="start N workers here (a GPU each), then plot"
    )
    group.add_argument("--slurm", type=int, metavar="N", help="submit N workers and the final pass to Slurm")
    group.add_argument(
        "--slurm-option",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help=f"a submitit option, e.g. slurm_partition gpu (defaults: {SLURM_DEFAULTS})",
    )
    return parser


def worker_argv(args) -> list[str]:
    """The arguments every worker (and the final pass) runs with: this command's, less the team options."""
    only = ["--only", *args.only] if args.only else []
    parameters = [item for pair in args.parameter for item in ("-p", *pair)]
    return ["--profile", args.profile, "--results-dir", args.results_dir, *only, *parameters]


def check_team_options(args) -> None:
    """--worker must read I/N, and --workers and --slurm must ask for at least one worker."""
    parse_worker(args.worker)
    for name in ("workers", "slurm"):
        count = getattr(args, name)
        if count is not None and count < 1:
            raise ConfigError(f"--{name} {count}: the number of workers must be >= 1")


def run_command(args, overrides: dict) -> int:
    """What the command line asks for: the dry-run, Slurm jobs, or the notebooks (by N workers first)."""
    check_team_options(args)
    if args.dry_run:
        print_budget(args.profile, args.only, overrides)
        return 0
    if args.slurm:
        return submit_slurm(args, worker_argv(args))
    if args.workers:
        run_workers(args.workers, worker_argv(args), Path(args.results_dir) / args.profile / "workers")
    records = run_pipeline(args.profile, args.only, args.results_dir, overrides, worker=args.worker)
    print(f"[pipeline] {len(records)} notebooks in {sum(r['seconds'] for r in records):.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    overrides = {name: parse_value(value) for name, value in args.parameter}
    try:
        return run_command(args, overrides)
    # Expected failures (bad input, a failing notebook or worker) end with a message, not a traceback.
    except (ConfigError, NotebookFailed, WorkersFailed) as error:
        print(f"[pipeline] error: {error}", file=sys.stderr)
        return 1


class WorkersFailed(RuntimeError):
    """A worker of --workers or --slurm exited with an error; the message names it and its log."""


def run_workers(count: int, argv: list[str], log_dir: Path) -> None:
    """--workers N: N worker processes of this command (each on its own GPU when there are N), their
    output shown line by line, prefixed with the worker, and kept in <log_dir>/worker-I-of-N.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()  # 0 without CUDA
    workers = []
    for i in range(1, count + 1):
        env = dict(os.environ)
        if gpus >= count:  # a GPU each
            env["CUDA_VISIBLE_DEVICES"] = str(i - 1)
        command = [sys.executable, "-m", "fedta_utils.pipeline", *argv, "--worker", f"{i}/{count}"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        workers.append((f"worker {i}/{count}", process, log_dir / f"worker-{i}-of-{count}.log"))
    threads = [threading.Thread(target=tee, args=worker) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [
        f"{name} exited {code} (log: {log})" for name, process, log in workers if (code := process.wait())
    ]
    if failed:
        raise WorkersFailed("; ".join(failed))


def tee(name: str, process, log: Path) -> None:
    with open(log, "w") as handle:
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            print(f"[{name}] {line}", end="", flush=True)


class PipelineJob:
    """`python -m fedta_utils.pipeline ARGV` as a submitit job. When the job reaches its time limit,
    submitit calls checkpoint() and requeues what it returns: the same command, which reads complete
    runs back and resumes the run in progress from its last checkpoint."""

    def __call__(self, argv: list[str]) -> None:
        # At the time limit submitit's handler exits this process; subprocess.run then kills the pipeline,
        # and its notebook kernel exits with it (ipykernel watches its parent).
        subprocess.run([sys.executable, "-m", "fedta_utils.pipeline", *argv], check=True)

    def checkpoint(self, argv: list[str]):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, argv)


def submit_slurm(args, argv: list[str]) -> int:
    """--slurm N: N worker jobs through submitit (an optional dependency), then the final pass as a job
    that starts once every worker has succeeded (afterok); on the local cluster (tests), which has no
    dependencies, once they have finished."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            '--slurm needs submitit, an optional dependency: pip install "fedta_utils[slurm]" '
            "(or pip install submitit)"
        ) from None
    options = {**SLURM_DEFAULTS, **{name: parse_value(value) for name, value in args.slurm_option}}
    cluster = options.pop("cluster")
    count = args.slurm
    executor = submitit.AutoExecutor(folder=Path(args.results_dir) / args.profile / "slurm", cluster=cluster)
    executor.update_parameters(name="fedta", **options)
    workers = [
        executor.submit(PipelineJob(), [*argv, "--worker", f"{i}/{count}"]) for i in range(1, count + 1)
    ]
    for i, job in enumerate(workers, 1):
        print(f"[pipeline] worker {i}/{count}: job {job.job_id}, log {job.paths.stdout}", flush=True)
    try:  # submitit's errors name the failed job and its log files
        if cluster == "local":
            for job in workers:
                job.result()
        else:
            executor.update_parameters(slurm_dependency="afterok:" + ":".join(job.job_id for job in workers))
        final = executor.submit(PipelineJob(), argv)
        print(f"[pipeline] final pass: job {final.job_id}, log {final.paths.stdout}", flush=True)
        if cluster == "local":
            final.result()
    except RuntimeError as error:
        raise WorkersFailed(str(error)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
