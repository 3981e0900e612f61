"""Run directories: identity, atomic checkpoints, fallbacks, metrics files, locks."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from fedta_utils import runs
from fedta_utils.runs import Checkpoint, Run, RunLockedError, config_id, read_metrics, rows_to_csv


def make_run(tmp_path, config=None):
    (tmp_path / ".staging").mkdir(exist_ok=True)
    return Run(tmp_path, "experiment", "name", config or {"lr": 0.1, "seed": 0})


def test_config_id_is_stable_and_order_independent():
    assert config_id({"a": 1, "b": [1, 2]}) == config_id({"b": [1, 2], "a": 1})
    assert config_id({"a": 1}) != config_id({"a": 2})


def test_run_folder_depends_on_the_config(tmp_path):
    assert make_run(tmp_path, {"lr": 0.1}).dir != make_run(tmp_path, {"lr": 0.2}).dir


def test_checkpoint_round_trip_and_keep_last_two(tmp_path):
    run = make_run(tmp_path)
    with run:
        for step in range(1, 5):
            rows = [{"epoch": e, "loss": 1.0 / e} for e in range(1, step + 1)]
            run.save_checkpoint(Checkpoint(step, {"w": torch.full((3,), float(step))}, rows, rows))
    assert sorted(p.name for p in run.dir.glob("checkpoint-*.pt")) == ["checkpoint-000003.pt", "checkpoint-000004.pt"]
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


def test_metrics_csv_holds_exactly_the_checkpointed_rows_with_exact_floats(tmp_path):
    run = make_run(tmp_path)
    rows = [{"round": 1, "loss": 0.1 + 0.2, "val_acc": None}, {"round": 2, "loss": 1 / 3, "val_acc": 0.5}]
    with run:
        run.save_checkpoint(Checkpoint(2, {}, rows, [{"round": 1, "wall_s": 1.5}, {"round": 2, "wall_s": 3.0}]))
    frame = read_metrics(run.dir)
    assert frame["loss"].tolist() == [0.1 + 0.2, 1 / 3]  # repr round-trips exactly
    assert frame["wall_s"].tolist() == [1.5, 3.0]
    assert (run.dir / "metrics.csv").read_text().splitlines()[0] == "round,loss,val_acc"


def test_rows_to_csv_unions_columns_in_order_of_appearance():
    text = rows_to_csv([{"a": 1}, {"a": 2, "b": 0.5}]).decode()
    assert text == "a,b\n1,\n2,0.5\n"


def test_finish_marks_completion_and_deletes_checkpoints(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {"w": torch.ones(1)}, [{"epoch": 1}], [{"epoch": 1}]))
        run.finish({"final_acc": 0.5}, [{"epoch": 1}], [{"epoch": 1}])
    assert run.is_complete and run.summary() == {"final_acc": 0.5}
    assert not list(run.dir.glob("checkpoint-*"))


def test_writes_need_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="with run"):
        make_run(tmp_path).save_checkpoint(Checkpoint(1, {}, [], []))


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    first = make_run(tmp_path)
    with first:
        with pytest.raises(RunLockedError, match="in use by pid"):
            with make_run(tmp_path):
                pass
    with make_run(tmp_path):  # released: free again
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run.dir / "lock.json").write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": dead.pid}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with run:
            pass
    assert not (run.dir / "lock.json").exists()


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir(parents=True)
    lock = run.dir / "lock.json"
    lock.write_text(json.dumps({"token": "x", "host": "another-vm", "pid": 1}))
    with pytest.raises(RunLockedError):
        with run:
            pass
    old = time.time() - runs.STALE_AFTER_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with run:
            pass


def test_config_mismatch_in_an_existing_folder_is_refused(tmp_path):
    run = make_run(tmp_path)
    with run:
        pass
    (run.dir / "config.json").write_text(json.dumps({"lr": 99}))
    with pytest.raises(RuntimeError, match="another config"):
        with make_run(tmp_path):
            pass


def test_rng_states_are_restored_from_a_checkpoint(tmp_path):
    run = make_run(tmp_path)
    torch.manual_seed(123)
    with run:
        run.save_checkpoint(Checkpoint(1, {}, [], []))
    expected = torch.rand(3)
    torch.manual_seed(999)
    run.load_checkpoint()
    assert torch.equal(torch.rand(3), expected)


def test_a_complete_run_drops_checkpoints_left_by_a_late_kill(tmp_path):
    run = make_run(tmp_path)
    with run:
        run.save_checkpoint(Checkpoint(1, {"w": torch.ones(1)}, [{"epoch": 1}], [{"epoch": 1}]))
        (run.dir / "summary.json").write_text("{}")  # killed after summary.json, before the deletion
    assert run.is_complete and list(run.dir.glob("checkpoint-*"))
    run.remove_leftover_checkpoints()
    assert not list(run.dir.glob("checkpoint-*"))
    assert run.is_complete
