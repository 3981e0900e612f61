"""Run directories: atomic writes, identity, checkpoints and their fallbacks, metrics files, the run lock."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedta_utils import runs
from fedta_utils.runs import (
    Checkpoint,
    CodeVersionChanged,
    Run,
    RunLock,
    RunLockedError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    clear_staging,
    config_id,
    read_metrics,
    rows_to_csv,
)

REPO = Path(__file__).resolve().parents[1]


def make_run(tmp_path, config=None):
    (tmp_path / ".staging").mkdir(exist_ok=True)
    return Run(tmp_path, "name", config or {"lr": 0.1, "seed": 0})


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_stage_in_the_results_root_and_leave_only_the_final_file(tmp_path, monkeypatch):
    (tmp_path / ".staging").mkdir()
    sources = []
    replace = os.replace
    monkeypatch.setattr(runs.os, "replace", lambda src, dst: (sources.append(src), replace(src, dst)))
    atomic_write_json(tmp_path / "a" / "b" / "x.json", {"b": 1, "a": [2]})
    assert (tmp_path / "a" / "b" / "x.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert [os.path.dirname(s) for s in sources] == [str((tmp_path / ".staging").resolve())]
    assert not list((tmp_path / ".staging").iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.bin"  # no results root: the temporary lives beside the file
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_torch_save_round_trips(tmp_path):
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))


def test_clear_staging_removes_old_leftovers_and_keeps_young_ones(tmp_path):
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / ".old.pt.x.tmp").write_bytes(b"")
    (staging / ".young.pt.y.tmp").write_bytes(b"")
    age(staging / ".old.pt.x.tmp", 120)
    clear_staging(tmp_path)
    assert [p.name for p in staging.iterdir()] == [".young.pt.y.tmp"]
    clear_staging(tmp_path / "missing")  # no staging folder: nothing to do


def test_opening_a_run_clears_the_staging_folder(tmp_path):
    run = make_run(tmp_path)
    leftover = tmp_path / ".staging" / ".checkpoint-000001.pt.abc.tmp"
    leftover.write_bytes(b"partial")
    age(leftover, 120)
    with run:
        pass
    assert not leftover.exists()


# --------------------------------------------------------------------------- CSV and identity


def test_config_id_is_stable_and_order_independent():
    assert config_id({"a": 1, "b": [1, 2]}) == config_id({"b": [1, 2], "a": 1})
    assert config_id({"a": 1}) != config_id({"a": 2})
    assert config_id({"a": 1}) == "9f89c740ce"  # never changes: folders keep their names


def test_run_folder_depends_on_the_config(tmp_path):
    assert make_run(tmp_path, {"lr": 0.1}).dir != make_run(tmp_path, {"lr": 0.2}).dir


def test_rows_to_csv_unions_columns_in_order_of_appearance():
    text = rows_to_csv([{"a": 1}, {"a": 2, "b": 0.5}]).decode()
    assert text == "a,b\n1,\n2,0.5\n"


def test_rows_to_csv_writes_numpy_floats_as_plain_exact_numbers():
    assert rows_to_csv([{"x": np.float64(1 / 3)}]).decode() == f"x\n{1 / 3!r}\n"


def test_metrics_csv_holds_exactly_the_checkpointed_rows_with_exact_floats(tmp_path):
    run = make_run(tmp_path)
    rows = [{"round": 1, "loss": 0.1 + 0.2, "val_acc": None}, {"round": 2, "loss": 1 / 3, "val_acc": 0.5}]
    timing = [{"round": 1, "wall_s": 1.5}, {"round": 2, "wall_s": 3.0}]
    with run:
        run.save_checkpoint(Checkpoint(2, {}, rows, timing))
    frame = run.metrics()
    assert frame["loss"].tolist() == [0.1 + 0.2, 1 / 3]  # repr round-trips exactly
    assert frame["wall_s"].tolist() == [1.5, 3.0]
    assert (run.dir / "metrics.csv").read_text().splitlines()[0] == "round,loss,val_acc"


def test_metrics_of_a_run_without_rows_are_an_empty_frame(tmp_path):
    assert read_metrics(tmp_path / "nothing").empty
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [], []))
    assert rows_to_csv([]) == b"" and run.metrics().empty


# --------------------------------------------------------------------------- runs and checkpoints


def test_checkpoint_round_trip_and_keep_last_two(tmp_path):
    run = make_run(tmp_path)
    with run:
        for step in range(1, 5):
            rows = [{"epoch": e, "loss": 1.0 / e} for e in range(1, step + 1)]
            run.save_checkpoint(Checkpoint(step, {"w": torch.full((3,), float(step))}, rows, rows))
    assert [p.name for p in sorted(run.dir.glob("checkpoint-*.pt"))] == [
        "checkpoint-000003.pt",
        "checkpoint-000004.pt",
    ]
    loaded = make_run(tmp_path).load_checkpoint()
    assert loaded.step == 4 and torch.equal(loaded.state["w"], torch.full((3,), 4.0))
    assert loaded.rows[-1] == {"epoch": 4, "loss": 0.25}


def test_unreadable_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}, [], []))
        run.save_checkpoint(Checkpoint(2, {"w": torch.zeros(2)}, [], []))
    newest = run.dir / "checkpoint-000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="checkpoint-000002.pt is unreadable"):
        loaded = run.load_checkpoint()
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.ones(2))


def test_garbage_checkpoint_is_skipped(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    (run.dir / "checkpoint-000009.pt").write_bytes(b"not a checkpoint at all")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert run.load_checkpoint() is None


def test_a_torch_file_that_is_not_a_fedta_checkpoint_is_skipped(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    torch.save({"step": 3}, run.dir / "checkpoint-000003.pt")
    with pytest.warns(RuntimeWarning, match="not a fedta checkpoint"):
        assert run.load_checkpoint() is None


def test_resume_rewrites_the_metrics_to_the_rows_of_the_checkpoint_it_uses(tmp_path):
    run = make_run(tmp_path)
    rows = [{"round": r, "loss": 1.0 / r} for r in (1, 2, 3)]
    with run:
        for step in (1, 2, 3):
            run.save_checkpoint(Checkpoint(step, {}, rows[:step], rows[:step]))
    newest = run.dir / "checkpoint-000003.pt"
    newest.write_bytes(newest.read_bytes()[:64])
    with make_run(tmp_path) as resumed, pytest.warns(RuntimeWarning, match="unreadable"):
        assert resumed.load_checkpoint().step == 2
    assert (run.dir / "metrics.csv").read_bytes() == rows_to_csv(rows[:2])
    assert (run.dir / "timing.csv").read_bytes() == rows_to_csv(rows[:2])


def test_resume_without_a_readable_checkpoint_removes_the_metrics(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [{"round": 1}], [{"round": 1}]))
    (run.dir / "checkpoint-000001.pt").write_bytes(b"garbage")
    with make_run(tmp_path) as resumed, pytest.warns(RuntimeWarning, match="unreadable"):
        assert resumed.load_checkpoint() is None
    assert not (run.dir / "metrics.csv").exists() and not (run.dir / "timing.csv").exists()


def test_loading_without_the_lock_writes_nothing(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [{"round": 1}], [{"round": 1}]))
    (run.dir / "metrics.csv").write_bytes(b"round\n1\n2\n")
    make_run(tmp_path).load_checkpoint()
    assert (run.dir / "metrics.csv").read_bytes() == b"round\n1\n2\n"


def test_torch_rng_state_is_restored_from_a_checkpoint(tmp_path):
    run = make_run(tmp_path)
    torch.manual_seed(123)
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [], []))
    expected = torch.rand(3)
    torch.manual_seed(999)
    run.load_checkpoint()
    assert torch.equal(torch.rand(3), expected)


def test_artifacts_round_trip(tmp_path):
    run = make_run(tmp_path)
    with run:
        assert not run.has_artifact("model.pt")
        run.save_artifact("model.pt", {"w": torch.ones(2)})
    assert run.has_artifact("model.pt") and torch.equal(run.load_artifact("model.pt")["w"], torch.ones(2))


def test_finish_marks_completion_and_deletes_checkpoints(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {"w": torch.ones(1)}, [{"epoch": 1}], [{"epoch": 1}]))
        assert not run.is_complete
        run.finish({"final_acc": 0.5}, [{"epoch": 1}], [{"epoch": 1}])
    assert run.is_complete and run.summary() == {"final_acc": 0.5}
    assert not list(run.dir.glob("checkpoint-*"))


def test_a_complete_run_drops_checkpoints_left_by_a_late_kill(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {"w": torch.ones(1)}, [{"epoch": 1}], [{"epoch": 1}]))
        (run.dir / "summary.json").write_text("{}")  # killed after summary.json, before the deletion
    assert run.is_complete and list(run.dir.glob("checkpoint-*"))
    run.remove_leftover_checkpoints()
    assert not list(run.dir.glob("checkpoint-*"))
    assert run.is_complete


def test_writes_need_the_lock(tmp_path):
    run = make_run(tmp_path)
    for write in (
        lambda: run.save_checkpoint(Checkpoint(1, {}, [], [])),
        lambda: run.finish({}, [], []),
        lambda: run.save_artifact("model.pt", {}),
    ):
        with pytest.raises(RuntimeError, match="with run"):
            write()


def test_config_mismatch_in_an_existing_folder_is_refused_and_the_lock_released(tmp_path):
    run = make_run(tmp_path)
    with run:
        pass
    assert json.loads((run.dir / "config.json").read_text()) == {
        "lr": 0.1,
        "seed": 0,
        "code_version": "unknown",
    }
    (run.dir / "config.json").write_text(json.dumps({"lr": 99}))
    with pytest.raises(RuntimeError, match="another config"):
        with make_run(tmp_path):
            pass
    assert not (run.dir / "lock.json").exists()


# --------------------------------------------------------------------------- lock


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    first = make_run(tmp_path)
    with first:
        holder = json.loads((first.dir / "lock.json").read_text())
        with pytest.raises(
            RunLockedError,
            match=f"in use by pid {os.getpid()} on {socket.gethostname()} "
            rf"\(started {holder['started']}\).*taken over at once",
        ):
            with make_run(tmp_path):
                pass
    assert not (first.dir / "lock.json").exists()
    with make_run(tmp_path):  # released: free again
        pass


def test_a_live_process_holds_the_lock_until_it_dies_then_it_is_taken_over(tmp_path):
    run = make_run(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedta_utils.runs import Run; "
            f"run = Run({str(tmp_path)!r}, 'name', {{'lr': 0.1, 'seed': 0}}); run.__enter__(); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} "):
            with run:
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(RuntimeWarning, match=f"taking over a stale lock on {run.dir} \\(pid {holder.pid} on "):
        with run:
            pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    pid = dead_pid()
    (run.dir / "lock.json").write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": pid}))
    with pytest.warns(RuntimeWarning, match=f"stale lock on .* \\(pid {pid} on {socket.gethostname()}\\)"):
        with run:
            assert json.loads((run.dir / "lock.json").read_text())["pid"] == os.getpid()
    assert not (run.dir / "lock.json").exists()


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    lock = run.dir / "lock.json"
    lock.write_text(json.dumps({"token": "x", "host": "another-vm", "pid": 1}))
    age(lock, runs.STALE_AFTER_SECONDS - 10)
    with pytest.raises(RunLockedError):
        with run:
            pass
    age(lock, runs.STALE_AFTER_SECONDS + 5)
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with run:
            pass


def test_an_empty_lock_file_is_held_briefly_then_taken_over(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    lock = run.dir / "lock.json"
    lock.write_bytes(b"")  # a kill between the exclusive create and the write
    with pytest.raises(RunLockedError):  # its writer may still be writing
        with run:
            pass
    age(lock, runs.UNREADABLE_LOCK_GRACE_SECONDS + 1)
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with run:
            pass


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.01)
    lock = RunLock(tmp_path / "lock.json")
    lock.acquire()
    age(lock.path, 1000)
    fresh = False
    for _ in range(500):  # up to ~5 s on a loaded machine; a beat is due every 0.01 s
        fresh = time.time() - lock.path.stat().st_mtime < 100
        if fresh:
            break
        time.sleep(0.01)
    lock.release()
    assert fresh, "the heartbeat never touched lock.json"


def test_release_removes_only_our_own_lock(tmp_path):
    lock = RunLock(tmp_path / "lock.json")
    lock.acquire()
    lock.path.write_text(json.dumps({"token": "someone else", "host": "another-vm", "pid": 1}))
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "someone else"


def test_two_takeovers_of_one_stale_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    path = tmp_path / "lock.json"
    path.write_text(json.dumps({"token": "dead", "host": socket.gethostname(), "pid": dead_pid()}))
    first, second = RunLock(path), RunLock(path)
    original = RunLock.holder

    def second_reads_then_first_takes_over(self):
        holder = original(self)
        if self is second and not getattr(self, "raced", False):
            self.raced = True
            first.acquire()  # the first process takes over between the second's read and its takeover
        return holder

    monkeypatch.setattr(RunLock, "holder", second_reads_then_first_takes_over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RunLockedError):
            second.acquire()
    assert json.loads(path.read_text())["token"] == first.token
    first.release()
    assert not path.exists()


@pytest.mark.filterwarnings("ignore:taking over a stale lock:RuntimeWarning")
def test_threads_racing_to_take_over_a_stale_lock_end_with_one_holder(tmp_path):
    stale = json.dumps({"token": "dead", "host": socket.gethostname(), "pid": dead_pid()})
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between almost every bytecode: many interleavings
    try:
        for attempt in range(100):
            path = tmp_path / f"lock-{attempt}.json"
            path.write_text(stale)
            locks, held, barrier = [RunLock(path) for _ in range(4)], [], threading.Barrier(4)

            def contend(lock, barrier=barrier, held=held):
                barrier.wait()
                with contextlib.suppress(RunLockedError):
                    lock.acquire()
                    held.append(lock)

            threads = [threading.Thread(target=contend, args=(lock,)) for lock in locks]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(held) == 1 and json.loads(path.read_text())["token"] == held[0].token, attempt
            held[0].release()
    finally:
        sys.setswitchinterval(interval)


def test_every_attempt_records_its_code_version_which_does_not_split_runs(tmp_path):
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="abc1234") as run:
        run.save_checkpoint(Checkpoint(1, {}, [], []))
    payload = torch.load(run.dir / "checkpoint-000001.pt", weights_only=True)
    assert payload["code_version"] == "abc1234"
    assert run.last_code_version() == "abc1234"
    assert (run.dir / "attempts.log").read_text().rstrip().endswith(" code abc1234")
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="def5678", allow_code_change=True) as again:
        assert again.dir == run.dir  # the same run, resumed by newer code
    assert again.last_code_version() == "def5678"


@pytest.mark.parametrize("work", ["checkpoint-000001.pt", "prepared.pt"])
def test_resuming_work_other_code_started_is_refused_naming_both_versions(tmp_path, work):
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="abc1234") as run:
        run.save_artifact(work, {"step": 1})
    newer = Run(tmp_path, "a", {"lr": 0.1}, code_version="def5678")
    with pytest.raises(
        CodeVersionChanged,
        match="started by code abc1234 and this is code def5678.*allow_code_change=True.*new results_dir",
    ):
        newer.__enter__()
    assert not (run.dir / "lock.json").exists()  # released: the refusal leaves the run as it was
    assert run.last_code_version() == "abc1234"
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="abc1234"):  # the same code resumes it
        pass


def test_a_run_whose_attempts_recorded_no_code_version_is_refused_as_unknown(tmp_path):
    run = Run(tmp_path, "a", {"lr": 0.1}, code_version="abc1234")
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [], []))
    (run.dir / "attempts.log").write_text("host pid 1 2026-01-01T00:00:00\n")  # written before versions
    with pytest.raises(CodeVersionChanged, match="started by code of an unknown version"):
        run.__enter__()


def test_a_fresh_run_and_a_complete_one_open_under_any_code_version(tmp_path):
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="abc1234") as run:  # nothing stored yet
        pass
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="def5678") as run:
        run.save_artifact("prepared.pt", {})
        run.finish({"final_val_acc": 0.5}, [], [])
    with Run(tmp_path, "a", {"lr": 0.1}, code_version="0000000") as complete:  # read back, never refused
        assert complete.is_complete


@pytest.mark.parametrize("kind", ["fedavg", "centralized", "head_only"])
def test_a_run_another_process_finished_while_this_one_took_its_lock_is_read_back_not_retrained(
    kind, workspace, small_data, monkeypatch
):
    from fedta_utils.experiments import run_head_only
    from fedta_utils.fedavg import FedAvgConfig, run_fedavg
    from fedta_utils.prepare import FineTuneSpec
    from fedta_utils.training import CentralizedConfig, run_centralized

    fedavg = FedAvgConfig(
        dataset="synthetic",
        model="tiny_vit",
        num_clients=10,
        rounds=2,
        local_steps=1,
        eval_points=1,
        eval_subset=100,
        precision="fp32",
    )
    runner, config = {
        "fedavg": (run_fedavg, fedavg),
        "centralized": (
            run_centralized,
            CentralizedConfig(
                dataset="synthetic",
                model="tiny_vit",
                epochs=1,
                batch_size=256,
                eval_points=1,
                eval_subset=100,
                precision="fp32",
            ),
        ),
        "head_only": (run_head_only, replace(fedavg, finetune=FineTuneSpec(head="ridge", ridge_lambda=1e-3))),
    }[kind]
    first = runner(workspace, small_data, config, eval_batch_size=128)
    files = ("metrics.csv", "summary.json", "attempts.log")
    written = {name: (first.run.dir / name).read_bytes() for name in files}
    # what a kill between summary.json and the checkpoints' deletion leaves
    leftover = first.run.dir / "checkpoint-000001.pt"
    leftover.write_bytes(b"a checkpoint")
    # The second process looked before summary.json reached it (Drive syncs late), then took the lock.
    looks = []

    def late_summary(run):
        looks.append(run.dir)
        return len(looks) > 1 and (run.dir / "summary.json").is_file()

    monkeypatch.setattr(Run, "is_complete", property(late_summary))
    second = runner(workspace, small_data, config, eval_batch_size=128)
    assert len(looks) >= 2  # it did look again once it held the lock
    assert {name: (first.run.dir / name).read_bytes() for name in files} == written  # nothing retrained
    assert second.summary == json.loads(written["summary.json"])  # what the first process wrote
    assert not leftover.exists()  # removed under the lock it holds
    assert not (first.run.dir / "lock.json").exists()
