"""Several workers on one results folder: shares, waiting stages, --workers, --slurm, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedta_utils import experiments, pipeline, runs, team
from fedta_utils.checks import ConfigError
from fedta_utils.workspace import setup_notebook

REPO = Path(__file__).resolve().parent.parent
SKIPPED = {"notebooks", "cache", "splits", "workers", "slurm", "00_data", ".staging"}


def run_metrics(results_dir: Path) -> dict[str, bytes]:
    """metrics.csv of every complete run under <results_dir>/smoke, by '<experiment>/<run folder>'."""
    root = Path(results_dir) / "smoke"
    return {
        f"{path.parent.parent.name}/{path.parent.name}": (path.parent / "metrics.csv").read_bytes()
        for path in sorted(root.glob("*/*/summary.json"))
        if path.parent.parent.name not in SKIPPED
    }


def attempts(results_dir: Path) -> dict[str, int]:
    """How many times each run was started or resumed (lines of its attempts.log)."""
    root = Path(results_dir) / "smoke"
    return {
        f"{p.parent.parent.name}/{p.parent.name}": len(p.read_text().splitlines())
        for p in root.glob("*/*/attempts.log")
    }


def mtimes(root: Path, experiment: str, name: str) -> list[float]:
    """When file `name` of each run the experiment's recorded grid names was last written."""
    return [
        (root / runs.RUNS_DIR / run / name).stat().st_mtime
        for run in runs.read_grid(root, experiment)["runs"]
    ]


def pipeline_process(*args: str, threads: str | None = "1", **kwargs) -> subprocess.Popen:
    """The smoke pipeline in a process of its own; `threads` per process (None: torch's default), the same
    for every process compared, so their results can be bit-identical."""
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fedta_utils.pipeline", "--profile", "smoke", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=1800)
    assert process.returncode == 0, out[-4000:]
    return out


# --------------------------------------------------------------------------- shares


@pytest.mark.parametrize(
    "worker, expected", [("1/1", (1, 1)), ("2/3", (2, 3)), (" 3/3 ", (3, 3)), ("", None), (None, None)]
)
def test_a_worker_is_i_of_n_counted_from_one(worker, expected):
    assert team.parse_worker(worker) == expected


@pytest.mark.parametrize("worker", ["3/2", "0/0", "a/b", "0/3", "1/0", "2", "1/2/3", 3])
def test_a_bad_worker_is_refused_by_name(worker):
    with pytest.raises(ConfigError, match=r"worker=.* is not allowed; write 'I/N' with 1 <= I <= N"):
        team.parse_worker(worker)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_shares_cover_every_full_grid_exactly_and_are_balanced_within_the_largest_run(workers):
    for group in pipeline.grids("full"):
        head_only = group["function"] is experiments.head_only_configs
        costs = [
            sum(team.run_work(c, group["params"], head_only)[k] for k in ("train", "eval"))
            for c in group["configs"]
        ]
        owners = team.assign(costs, workers)
        assert len(owners) == len(costs) and set(owners) <= set(range(1, workers + 1))  # one share each
        loads = [sum(c for c, o in zip(costs, owners) if o == w) for w in range(1, workers + 1)]
        assert sum(loads) == sum(costs)
        assert max(loads) - min(loads) <= max(costs), group["group"]
        assert team.assign(costs, workers) == owners  # from the grid alone


def test_assign_puts_the_costliest_runs_on_different_workers_first():
    assert team.assign([1, 5, 3, 5], 2) == [2, 1, 1, 2]  # 5 -> w1, 5 -> w2, 3 -> w1, 1 -> w2: loads 8 / 6


def test_wait_for_stops_with_what_it_waited_for(capsys):
    with pytest.raises(team.WaitTimeout, match=r"gave up after waiting 0.2 s \(wait_limit\) for run-a"):
        team.wait_for(lambda: "run-a (worker 2/3)", 0.2, poll=0.05)
    assert "[worker] waiting for run-a (worker 2/3)" in capsys.readouterr().out
    team.wait_for(lambda: "", 0.0)  # nothing missing: returns at once


def test_a_bad_worker_in_a_notebook_is_refused_before_anything_loads(tmp_path):
    namespace = pipeline.notebook_values(REPO / "notebooks" / "03_heterogeneity.ipynb", "smoke", {})
    namespace.update(results_dir=str(tmp_path / "results"), worker="3/2")
    with pytest.raises(ConfigError, match=r"worker='3/2' is not allowed"):
        setup_notebook("03", namespace)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--worker", "3/2"], "worker='3/2' is not allowed"),
        (["--worker", "a/b"], "worker='a/b' is not allowed"),
        (["--workers", "0"], "--workers 0: the number of workers must be >= 1"),
        (["--slurm", "0"], "--slurm 0: the number of workers must be >= 1"),
    ],
)
def test_bad_team_options_are_refused_before_any_compute(argv, message, tmp_path, capsys):
    assert pipeline.main(["--profile", "smoke", "--results-dir", str(tmp_path / "r"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_slurm_without_submitit_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    assert pipeline.main(["--profile", "smoke", "--results-dir", str(tmp_path / "r"), "--slurm", "2"]) == 1
    assert 'pip install "fedta_utils[slurm]"' in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- workers at once
#
# Each scenario runs the smallest grid that still exercises it: seed 0 only (every search runs at seed
# 0, so every choice is the smoke pipeline's), one N_c, one value where a stage needs no choice. Each of
# its runs is then a run of the test session's smoke pipeline (one process, one thread per kernel) with
# the same config, and must equal it bit for bit.

SEED_0 = ("-p", "seeds", "[0]")
NC_1 = ("-p", "classes_per_client_grid", "[1]")


def same_as_smoke(made: dict[str, bytes], smoke_results: dict) -> bool:
    """Every run in `made` is a run of the smoke pipeline with the very same metrics.csv."""
    reference = run_metrics(smoke_results["results_dir"])
    strangers = sorted(made.keys() - reference.keys())
    assert not strangers, f"not runs of the smoke pipeline: {strangers}"
    return made == {key: reference[key] for key in made}


def smoke_choices(smoke_results: dict) -> dict:
    """What the smoke pipeline's searches chose (hparams.json)."""
    return json.loads((smoke_results["results_dir"] / "smoke" / "hparams.json").read_text())


# The three tests below need no choice of the smoke pipeline's: they run their scenario while it may
# still be running and compare at the end. The single-process ones come first, to share the two cores
# with the pipeline's last notebooks.


@pytest.mark.slow
def test_a_slurm_job_at_its_time_limit_is_requeued_and_resumes_bit_identical(
    smoke_pipeline, tmp_path, monkeypatch
):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits it, as the reference did
    results = tmp_path / "results"
    # The local executor plays Slurm's time limit: 25 s into every attempt it sends the job the signal
    # Slurm sends before the limit (USR2); submitit's hook requeues, and the next attempt resumes.
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm", max_num_timeout=30)
    executor.update_parameters(timeout_min=0.5, signal_delay_s=5)
    job = executor.submit(
        pipeline.PipelineJob(),
        ["--profile", "smoke", "--only", "02", "03", *SEED_0, *NC_1, "--results-dir", str(results)],
    )
    job.result()
    assert "timed-out" in job.stderr() and "Requeued job" in job.stdout()  # 02 and 03 take over 25 s
    made = run_metrics(results)
    assert len(made) == 2 + 1 + 3
    assert same_as_smoke(made, smoke_pipeline.result())
    assert max(attempts(results).values()) >= 2  # a run interrupted mid-way resumed from its checkpoint


@pytest.mark.slow
def test_slurm_local_workers_end_with_the_single_process_results(smoke_pipeline, tmp_path):
    pytest.importorskip("submitit")
    results = tmp_path / "results"
    slurm = ("--slurm", "2", "--slurm-option", "cluster", "local", "--slurm-option", "timeout_min", "30")
    out = finish(pipeline_process("--only", "02", "--results-dir", str(results), *SEED_0, *slurm))
    assert "worker 2/2: job" in out and "final pass: job" in out
    made = run_metrics(results)
    assert len(made) == 2 + 1  # 02's two search runs, then iid at seed 0
    assert same_as_smoke(made, smoke_pipeline.result())


@pytest.mark.slow
def test_three_workers_train_every_run_once_and_match_a_single_process(smoke_pipeline, tmp_path):
    results = tmp_path / "results"
    args = (
        "--only",
        "01",
        "02",
        "03",
        "--results-dir",
        str(results),
        *SEED_0,
        *NC_1,
        "-p",
        "schedulers",
        "['cosine']",
    )
    workers = [pipeline_process(*args, "--worker", f"{i}/3") for i in (1, 2, 3)]
    for process in workers:
        finish(process)
    made = run_metrics(results)
    # 01: 2 x 2 search runs, then cosine; 02: two search runs, then iid; 03: iid at J=4, Nc=1 at J=2
    # and 4 (iid at J=2 is 02's run); all at seed 0
    assert len(made) == (4 + 1) + (2 + 1) + 3
    assert same_as_smoke(made, smoke_pipeline.result())  # bit-identical, every run
    assert set(attempts(results).values()) == {1}  # every run trained exactly once
    assert attempts(results).keys() == made.keys()
    root = results / "smoke"  # the stages waited: no run of a grid started before the last search run ended
    search_done = max(mtimes(root, "01_lr_search", "summary.json"))
    assert min(mtimes(root, "01_centralized", "attempts.log")) >= search_done
    fed_search_done = max(mtimes(root, "02_lr_search", "summary.json"))
    started = mtimes(root, "02_fedavg_iid", "attempts.log") + mtimes(root, "03_heterogeneity", "attempts.log")
    assert min(started) >= fed_search_done


@pytest.mark.slow
def test_a_killed_worker_started_again_finishes_its_share_bit_identical(smoke_results, tmp_path):
    chosen = smoke_choices(smoke_results)  # 02's choice, as -p values
    results = tmp_path / "results"
    args = (
        "--only",
        "03",
        "--results-dir",
        str(results),
        *SEED_0,
        *NC_1,
        "-p",
        "lr",
        repr(chosen["fedavg_lr"]),
        "-p",
        "weight_decay",
        repr(chosen["fedavg_weight_decay"]),
    )
    victim = pipeline_process(*args, "--worker", "1/2", start_new_session=True)
    deadline = time.monotonic() + 600
    while not (in_flight := [p.parent for p in (results / "smoke").glob("*/*/checkpoint-*.pt")]):
        assert time.monotonic() < deadline and victim.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the pipeline and its notebook kernel, mid-run
    victim.wait()
    killed = f"{in_flight[0].parent.name}/{in_flight[0].name}"
    processes = [pipeline_process(*args, "--worker", worker) for worker in ("1/2", "2/2")]
    for process in processes:
        finish(process)
    made = run_metrics(results)
    assert len(made) == 2 * 2  # 03's grid at seed 0: (iid, Nc=1) x J=2, 4
    assert same_as_smoke(made, smoke_results)
    assert attempts(results)[killed] == 2  # the killed run resumed
    assert sorted(attempts(results).values()).count(2) == 1


@pytest.mark.slow
def test_workers_2_end_with_the_single_process_results(smoke_results, tmp_path):
    """--workers 2 on notebooks 04 and 05, with every kind of stage the three-workers test lacks: the
    step-0 heads (head-only runs that later stages wait for), a search under the frozen head, the sparse
    grid, the centralized baseline, the mask rules; then the final pass, which reads every run back and
    plots (and trains nothing again)."""
    chosen = smoke_choices(smoke_results)  # 01's and 02's choices, as -p values
    one_value = {
        "lr": chosen["fedavg_lr"],
        "weight_decay": chosen["fedavg_weight_decay"],
        "central_scheduler": chosen["central_scheduler"],
        "central_weight_decay": chosen["central_weight_decay"],
        "sparse_search_lrs": [chosen["sparse_lr"]],
        "sparse_central_search_lrs": [chosen["sparse_central_lr"]],
        "sparsities": [0.9],
        "calibration_rounds_grid": [2],
        "rules": ["least_sensitive", "random"],
    }
    values = [item for name, value in one_value.items() for item in ("-p", name, repr(value))]
    results = tmp_path / "results"
    started = time.perf_counter()
    out = finish(
        pipeline_process(
            "--only", "04", "05", "--results-dir", str(results), "--workers", "2", *SEED_0, *values
        )
    )
    print(f"--workers 2, notebooks 04 and 05 at seed 0: {time.perf_counter() - started:.0f} s")
    assert "[worker 1/2]" in out and "[worker 2/2]" in out
    assert (results / "smoke" / "workers" / "worker-2-of-2.log").is_file()
    finals = sorted(p.name for p in (results / "smoke" / "notebooks").glob("*.ipynb"))
    assert finals == ["04_sparse_fl.ipynb", "05_mask_rules.ipynb"]  # the final pass
    made = run_metrics(results)
    # 04: two heads (iid, Nc=5), the search, 3 runs per sharding (trained head, dense and sparse under
    # the frozen head), the centralized baseline's search (one lr) and the baseline; 05: 2 rules x 2
    # shardings, least-sensitive being 04's runs
    assert len(made) == (2 + 1 + 2 * 3 + 1 + 1) + 2
    assert same_as_smoke(made, smoke_results)
    assert set(attempts(results).values()) == {1}  # trained once each: the final pass read them back


def test_a_worker_lists_its_grid_and_its_figures_name_the_runs_not_complete(
    workspace, small_data, capsys, monkeypatch
):
    from fedta_utils import experiments, figures
    from fedta_utils.fedavg import FedAvgConfig, run_fedavg

    base = FedAvgConfig(
        dataset="synthetic",
        model="tiny_vit",
        img_size=32,
        num_clients=10,
        rounds=1,
        local_steps=1,
        eval_points=1,
        eval_subset=100,
        precision="fp32",
    )
    configs = [replace(base, seed=0), replace(base, seed=1)]
    monkeypatch.setattr(team, "PENDING", {})  # this process's record, restored after the test
    params = {"worker": "1/2", "wait_limit": 0.1, "eval_batch_size": 128}
    done = experiments.run_grid(
        run_fedavg,
        workspace,
        small_data,
        experiments.HETEROGENEITY,
        configs=configs,
        params=params,
        wait=False,
    )
    assert [r.run.config["seed"] for r in done] == [0]  # worker 1 trained its share only
    table = capsys.readouterr().out
    assert "complete" in table and "not started" in table and "worker" in table
    other = team.PENDING[experiments.HETEROGENEITY]
    assert len(other) == 1 and "-s1-" in other[0]  # the other share's run
    fig = figures.heterogeneity_heatmap(workspace.root, "smoke")  # the complete run; the missing one named
    assert any(other[0].rsplit("-", 1)[0] in text.get_text() for text in fig.texts)
    team.PENDING.clear()
    texts = figures.heterogeneity_heatmap(workspace.root, "smoke").texts
    assert not [text for text in texts if "Not drawn" in text.get_text()]  # the final pass marks nothing
