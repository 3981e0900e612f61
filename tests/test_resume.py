"""Kill at any moment, resume, and end bit for bit where an uninterrupted run ends.

Each experiment (FedAvg, sparse FedAvg with a ridge head and Fisher masks,
centralized) runs once uninterrupted as the reference, then again under a
series of SIGKILLs at moments drawn from a seeded RNG: a random moment of a
random round (uniform over the round's duration), the middle of an
evaluation, of a checkpoint write, of the metrics.csv write that follows it,
of the final model.pt write, and of start-up or mask calibration. After every
kill the process is reaped, every file under the results root (outside
.staging/) must parse or load, and metrics.csv must hold exactly the rows of a
checkpoint on disk; then the run is resumed. The final metrics.csv must equal
the reference byte for byte, and model.pt (and prepared.pt) tensor for tensor.

Runs happen in children forked by tests/resume_worker.py's zygote (one import
of torch for the whole module); see that file for the events the children log
and the slowed-down writes that make a kill inside a write possible.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedta_utils.runs import rows_to_csv
from fedta_utils.training import eval_steps

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("resume_worker.py")
WRITE_SECONDS = 0.15  # every file write takes this long in the children (8 chunks), like a slow Drive
POLL_SECONDS = 0.005
ATTEMPT_TIMEOUT = 240  # seconds a child may take before the test gives up on it
KILL_SEED = 20240607

sys.path.insert(0, str(WORKER.parent))
import resume_worker  # noqa: E402  (the experiments' configs and run folders)

# --------------------------------------------------------------------------- the zygote and its children


class Zygote:
    """A process that has imported torch once and forks a fresh child per run."""

    def __init__(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.unreaped: set[int] = set()

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def start(self, spec: dict, log: Path) -> int:
        pid = self._ask({"start": spec, "log": str(log)})["pid"]
        self.unreaped.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        """Reap the child (so its pid is really gone) and return its exit code, -9 after SIGKILL."""
        status = self._ask({"wait": pid})["status"]
        self.unreaped.discard(pid)
        return status

    def close(self):
        for pid in sorted(self.unreaped):  # children of a failed test: stop them, they are ours
            os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@dataclass
class Event:
    t: float
    round: int
    kind: str
    what: str


@dataclass
class Attempt:
    pid: int
    events_path: Path
    log_path: Path

    def events(self) -> list[Event]:
        if not self.events_path.exists():
            return []
        found = []
        for line in self.events_path.read_text().splitlines():
            t, round_index, kind, what = line.split(" ", 3)
            found.append(Event(float(t), int(round_index), kind, what))
        return found

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


class Runner:
    """Starts numbered attempts of one experiment on one results folder."""

    def __init__(self, zygote: Zygote, experiment: str, results_dir: Path, scratch: Path):
        self.zygote, self.experiment = zygote, experiment
        self.results_dir, self.scratch = results_dir, scratch
        self.count = 0
        scratch.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self.results_dir / "smoke"

    @property
    def run_dir(self) -> Path:
        return resume_worker.run_dir(self.results_dir, self.experiment)

    def start(self) -> Attempt:
        self.count += 1
        events = self.scratch / f"events-{self.count}"
        log = self.scratch / f"log-{self.count}"
        spec = {
            "experiment": self.experiment,
            "results_dir": str(self.results_dir),
            "events": str(events),
            "write_seconds": WRITE_SECONDS,
        }
        return Attempt(self.zygote.start(spec, log), events, log)

    def finish(self, attempt: Attempt) -> None:
        status = self.zygote.wait(attempt.pid)
        assert status == 0, f"attempt exited with {status}:\n{attempt.log()[-3000:]}"

    def run_to_end(self) -> Attempt:
        attempt = self.start()
        self.finish(attempt)
        return attempt


def wait_for(attempt: Attempt, predicate, timeout: float = ATTEMPT_TIMEOUT) -> Event | None:
    """The first event of `attempt` that satisfies `predicate`; None if the child ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in attempt.events():
            if predicate(event):
                return event
            if event.kind in ("finished", "error"):
                return None
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"no matching event within {timeout} s:\n{attempt.log()[-3000:]}")


def kill_and_reap(zygote: Zygote, attempt: Attempt) -> float:
    """SIGKILL the child, wait until the zygote has reaped it; returns when the signal was sent."""
    sent = time.monotonic()
    os.kill(attempt.pid, signal.SIGKILL)
    assert zygote.wait(attempt.pid) == -signal.SIGKILL
    return sent


def phase_at_kill(events: list[Event]) -> str:
    """What the child was doing when it died: the phases it had started and not ended, outermost first."""
    open_phases: list[Event] = []
    for event in events:
        if event.kind.endswith("-start"):
            open_phases.append(event)
        elif event.kind.endswith("-end") and open_phases:
            open_phases.pop()
    if not events:
        return "start-up"
    where = f"round {events[-1].round}" if events[-1].round >= 0 else "before round 0"
    if not open_phases:
        last = events[-1]
        what = f" {last.what}" if last.kind.startswith("write") else ""
        return f"between phases, after {last.kind}{what} [{where}]"
    names = [e.kind.removesuffix("-start") + (f" {e.what}" if e.what != "-" else "") for e in open_phases]
    return " > ".join(names) + f" [{where}]"


# --------------------------------------------------------------------------- what must hold after a kill


def assert_every_file_complete(root: Path) -> None:
    """Every file under `root` outside .staging/ parses or loads; metrics.csv matches a checkpoint."""
    for path in sorted(root.rglob("*")):
        if path.is_dir() or ".staging" in path.relative_to(root).parts:
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npz":
            with np.load(path) as stored:
                [stored[key] for key in stored.files]
        elif path.name == "attempts.log":  # appended once per start or resume: a line per attempt
            assert all(" pid " in line for line in path.read_text().splitlines()), path
        else:
            raise AssertionError(f"unexpected file {path}")
    for run_dir in root.glob("*/*"):
        assert_metrics_match_a_checkpoint(run_dir)


def assert_metrics_match_a_checkpoint(run_dir: Path) -> None:
    """metrics.csv and timing.csv never hold a row that no checkpoint (or the finished run) holds."""
    metrics = run_dir / "metrics.csv"
    if not metrics.exists() or (run_dir / "summary.json").exists():
        return
    checkpoints = [torch.load(p, weights_only=True) for p in sorted(run_dir.glob("checkpoint-*.pt"))]
    assert checkpoints, f"{metrics} exists without a checkpoint or a summary"
    assert metrics.read_bytes() in [rows_to_csv(c["rows"]) for c in checkpoints]
    timing = run_dir / "timing.csv"  # written just after metrics.csv: may lag it by one checkpoint
    assert not timing.exists() or timing.read_bytes() in [rows_to_csv(c["timing"]) for c in checkpoints]


def assert_same_final_results(run_dir: Path, reference_dir: Path) -> None:
    assert (run_dir / "metrics.csv").read_bytes() == (reference_dir / "metrics.csv").read_bytes()
    assert (run_dir / "config.json").read_bytes() == (reference_dir / "config.json").read_bytes()
    assert_same_tensors(load(run_dir / "model.pt"), load(reference_dir / "model.pt"))
    assert_same_tensors(load(run_dir / "prepared.pt"), load(reference_dir / "prepared.pt"))
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    summary.pop("wall_s"), expected.pop("wall_s")
    assert summary == expected
    rounds = pd.read_csv(run_dir / "metrics.csv").iloc[:, 0].tolist()
    assert rounds == list(range(1, len(rounds) + 1))  # neither duplicates nor gaps
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "lock.json").exists()


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(actual, expected, where="") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tensors(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


# --------------------------------------------------------------------------- reference runs


@pytest.fixture(scope="module")
def references(zygote, tmp_path_factory):
    """Uninterrupted runs, made on first use: experiment -> (run folder, its events)."""
    made = {}

    def get(experiment: str):
        if experiment not in made:
            base = tmp_path_factory.mktemp(f"reference-{experiment}")
            runner = Runner(zygote, experiment, base / "results", base / "scratch")
            attempt = runner.run_to_end()
            made[experiment] = (runner.run_dir, attempt.events())
        return made[experiment]

    return get


# --------------------------------------------------------------------------- kill plans


@dataclass
class Kill:
    kind: str  # setup | prepare | random | eval | checkpoint | metrics | final
    round: int  # the (0-based) round or epoch it targets; -1 before the first
    delay: float  # seconds after its trigger event

    def trigger(self, event: Event) -> bool:
        if self.kind == "setup":
            return event.kind == "spawned"
        if self.kind == "prepare":
            return event.kind == "prepare-start"
        if self.kind == "random":
            return event.kind == "round-start" and event.round >= self.round
        if self.kind == "eval":
            return event.kind == "eval-start" and event.round == self.round
        if self.kind == "checkpoint":
            return event.kind == "write-start" and event.what == f"checkpoint-{self.round + 1:06d}.pt"
        if self.kind == "metrics":
            return event.kind == "write-start" and event.what == "metrics.csv" and event.round == self.round
        return event.kind == "write-start" and event.what == "model.pt"

    def expected_phase(self) -> str | None:
        """The phase this kill is aimed at (None: a random moment, anything goes)."""
        return {
            "prepare": "prepare",
            "eval": "eval",
            "checkpoint": "write checkpoint-",
            "metrics": "write metrics.csv",
            "final": "write model.pt",
        }.get(self.kind)


PLANS = {
    # the kinds of kill per experiment; rounds and delays are drawn by plan_kills
    "fedavg": ["setup", "random", "random", "random", "eval", "checkpoint", "metrics", "final"],
    "sparse": ["prepare", "random", "random", "random", "eval", "checkpoint", "metrics", "final"],
    "centralized": ["random", "eval", "checkpoint", "final"],
}


def plan_kills(experiment: str, reference_events: list[Event], rng: random.Random) -> list[Kill]:
    """Kill moments drawn from `rng`, each in a different round, in the order they will happen."""
    _, config, checkpoint_every, rounds = resume_worker.EXPERIMENTS[experiment]
    evaluated = set(eval_steps(rounds, config.eval_points))  # rounds, or epochs for CENTRALIZED
    times = {}
    for event in reference_events:
        times.setdefault((event.kind, event.round, event.what), event.t)
    round_start = [times[("round-start", r, "-")] for r in range(rounds)] + [reference_events[-1].t]
    allowed = {
        "random": lambda r: True,
        "eval": lambda r: r + 1 in evaluated,
        "checkpoint": lambda r: (r + 1) % checkpoint_every == 0 or r + 1 == rounds,
        "final": lambda r: r + 1 == rounds,
    }
    allowed["metrics"] = allowed["checkpoint"]
    kinds = PLANS[experiment]
    free = set(range(rounds))
    kills = []
    # the most constrained kinds choose their round first
    for kind in sorted(
        kinds, key=lambda k: ["setup", "prepare", "final", "eval", "checkpoint", "metrics", "random"].index(k)
    ):
        if kind == "setup":
            kills.append(Kill(kind, -1, rng.uniform(0.05, 0.95) * round_start[0]))
            continue
        if kind == "prepare":
            length = times[("prepare-end", -1, "-")] - times[("prepare-start", -1, "-")]
            kills.append(Kill(kind, -1, rng.uniform(0.1, 0.5) * length))
            continue
        r = rng.choice(sorted(r for r in free if allowed[kind](r)))
        free.discard(r)
        if kind == "random":
            delay = rng.uniform(0.0, 1.0) * (round_start[r + 1] - round_start[r])
        elif kind == "eval":
            delay = rng.uniform(0.0, 0.2) * (times[("eval-end", r, "-")] - times[("eval-start", r, "-")])
        else:  # inside a write of WRITE_SECONDS
            delay = rng.uniform(0.1, 0.5) * WRITE_SECONDS
        kills.append(Kill(kind, r, delay))
    return sorted(kills, key=lambda k: k.round)


# --------------------------------------------------------------------------- the torture test


@pytest.mark.parametrize("experiment", ["fedavg", "sparse", "centralized"])
def test_killed_at_random_moments_and_resumed_ends_bit_identical(experiment, zygote, references, tmp_path):
    reference_dir, reference_events = references(experiment)
    kills = plan_kills(experiment, reference_events, random.Random(f"{KILL_SEED}-{experiment}"))
    runner = Runner(zygote, experiment, tmp_path / "results", tmp_path / "scratch")
    survived = []
    for kill in kills:
        staged_before = set((runner.root / ".staging").glob("*.tmp"))
        lock_left = (runner.run_dir / "lock.json").exists()
        attempt = runner.start()
        trigger = wait_for(attempt, kill.trigger)
        assert trigger is not None, f"{kill} never triggered:\n{attempt.log()[-3000:]}"
        time.sleep(kill.delay)
        sent = kill_and_reap(zygote, attempt)
        events = attempt.events()
        phase = phase_at_kill(events)
        seconds = sent - float(events[0].what)  # since the child started
        survived.append(f"{kill.kind:10s} round {kill.round:2d}, {seconds:5.2f} s after start: {phase}")
        if kill.expected_phase() is not None:
            assert kill.expected_phase() in phase, f"{kill} landed in {phase}"
        if kill.kind in ("checkpoint", "metrics", "final"):  # the torn write stays out of sight in .staging
            name = phase.split(" [")[0].rsplit(" ", 1)[1]
            torn = set((runner.root / ".staging").glob(f".{name}.*.tmp")) - staged_before
            assert len(torn) == 1, f"no partial temp file of {name} in .staging"
            if kill.kind != "metrics":
                cut_short = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)
                with pytest.raises(cut_short):
                    torch.load(torn.pop(), weights_only=True)
        if lock_left:
            assert "taking over a stale lock" in attempt.log()
        assert_every_file_complete(runner.root)
    final = runner.run_to_end()
    assert "error" not in [e.kind for e in final.events()]
    assert_same_final_results(runner.run_dir, reference_dir)
    print(f"\n{experiment}: survived {len(survived)} kills\n  " + "\n  ".join(survived))
    assert len(survived) == len(PLANS[experiment])


# --------------------------------------------------------------------------- damaged files and locks


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(zygote, references, tmp_path):
    reference_dir, _ = references("fedavg")
    runner = Runner(zygote, "fedavg", tmp_path / "results", tmp_path / "scratch")
    attempt = runner.start()
    assert wait_for(attempt, lambda e: e.kind == "write-end" and e.what == "timing.csv" and e.round == 4)
    kill_and_reap(zygote, attempt)
    newest = runner.run_dir / "checkpoint-000005.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    staging = runner.root / ".staging"
    old_torn = staging / ".checkpoint-000003.pt.dead01.tmp"
    old_torn.write_bytes(b"PK\x03\x04 half a zip")
    an_hour_ago = time.time() - 3600
    os.utime(old_torn, (an_hour_ago, an_hour_ago))

    resumed = runner.run_to_end()

    assert "checkpoint-000005.pt is unreadable" in resumed.log()
    assert "falling back to the previous one" in resumed.log()
    first_round = min(e.round for e in resumed.events() if e.kind == "round-start")
    assert first_round == 4  # round 5 (0-based 4) is trained again from checkpoint 4
    assert not old_torn.exists()
    assert_same_final_results(runner.run_dir, reference_dir)


def test_a_second_process_on_the_same_run_is_refused_and_the_first_finishes(zygote, references, tmp_path):
    reference_dir, _ = references("fedavg")
    runner = Runner(zygote, "fedavg", tmp_path / "results", tmp_path / "scratch")
    first = runner.start()
    assert wait_for(first, lambda e: e.kind == "round-start" and e.round == 2)
    second = runner.start()
    assert zygote.wait(second.pid) == 1
    refusal = [e for e in second.events() if e.kind == "error"]
    assert refusal and refusal[0].what.startswith("RunLockedError:")
    assert f"in use by pid {first.pid}" in refusal[0].what
    assert not [e for e in second.events() if e.kind == "write-start"]  # it wrote nothing
    runner.finish(first)
    assert_same_final_results(runner.run_dir, reference_dir)


def test_the_stale_lock_of_a_killed_process_is_taken_over(zygote, references, tmp_path):
    reference_dir, _ = references("fedavg")
    runner = Runner(zygote, "fedavg", tmp_path / "results", tmp_path / "scratch")
    killed = runner.start()
    assert wait_for(killed, lambda e: e.kind == "round-start" and e.round == 1)
    kill_and_reap(zygote, killed)
    assert json.loads((runner.run_dir / "lock.json").read_text())["pid"] == killed.pid
    resumed = runner.run_to_end()
    assert f"taking over a stale lock on {runner.run_dir} (pid {killed.pid}" in resumed.log()
    assert_same_final_results(runner.run_dir, reference_dir)
