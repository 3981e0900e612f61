"""Runs one small experiment in a process that the kill tests may SIGKILL at any moment.

    python tests/resume_worker.py '{"experiment": "fedavg", "results_dir": "...", "events": "..."}'
    python tests/resume_worker.py --zygote

The zygote imports torch, timm and fedta_utils once and then forks one fresh
child per request, so a kill-and-resume cycle costs milliseconds instead of
the ~8 s an import takes on a busy 2-core machine. A child is a real process:
its own pid, its own lock, killed by SIGKILL and reaped by the zygote, which
reports the exit status. Protocol (one JSON object a line):

    -> {"start": spec, "log": path}   <- {"pid": pid}
    -> {"wait": pid}                   <- {"pid": pid, "status": exit code, or -signal}

The child writes events (one line each, appended unbuffered) to spec["events"]:
`<seconds since start> <round> <kind> <what>`, where kind is start/end of a
phase (prepare, train, eval, write) and round is the epoch or round in
progress (-1 before the first). Writes go through a slowed-down file object
(`write_seconds` per file, in chunks, like Drive), so a kill can land in the
middle of one. None of this changes what the run computes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from fedta_utils import fedavg, runs, training  # noqa: E402
from fedta_utils.fedavg import FedAvgConfig, run_fedavg  # noqa: E402
from fedta_utils.prepare import FineTuneSpec  # noqa: E402
from fedta_utils.training import CentralizedConfig, run_centralized  # noqa: E402
from fedta_utils.workspace import setup_workspace  # noqa: E402

TRAIN_SIZE, TEST_SIZE = 1000, 200  # synthetic images: 900 train / 100 val / 200 test, 100 classes

FEDAVG = dict(
    dataset="synthetic",
    model="tiny_vit",
    num_clients=10,
    participation=0.3,
    local_steps=2,
    rounds=10,
    batch_size=16,
    lr=0.05,
    eval_points=5,
    precision="fp32",
)
SPARSE = dict(
    FEDAVG,
    rounds=8,
    sharding="non_iid",
    classes_per_client=10,
    finetune=FineTuneSpec(
        head="ridge", mask_rule="least_sensitive", sparsity=0.9, calibration_rounds=2, calibration_samples=200
    ),
)
CENTRALIZED = dict(
    dataset="synthetic",
    model="tiny_vit",
    epochs=4,
    batch_size=64,
    lr=0.05,
    scheduler="cosine",
    warmup_epochs=0.5,
    precision="fp32",
    eval_points=4,
)  # one evaluation at the end of each epoch

EXPERIMENTS = {
    # name: (runner, config, checkpoint_every, number of rounds or epochs)
    "fedavg": (run_fedavg, FedAvgConfig(**FEDAVG), 1, FEDAVG["rounds"]),
    "sparse": (run_fedavg, FedAvgConfig(**SPARSE), 2, SPARSE["rounds"]),
    "centralized": (run_centralized, CentralizedConfig(**CENTRALIZED), 1, CENTRALIZED["epochs"]),
}


# --------------------------------------------------------------------------- events


class Events:
    """Appends `<t> <round> <kind> <what>` lines to a file, one os.write each (never torn)."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self.started = time.monotonic()
        self.round = -1

    def __call__(self, kind: str, what: str = "-") -> None:
        if self.fd is not None:
            line = f"{time.monotonic() - self.started:.4f} {self.round} {kind} {what}\n"
            os.write(self.fd, line.encode())


class SlowFile:
    """A file object whose write() takes `seconds`, in chunks that reach the disk as it goes."""

    CHUNKS = 8

    def __init__(self, file, name: str, seconds: float, events: Events):
        self.file, self.name, self.seconds, self.events = file, name, seconds, events

    def write(self, data):
        self.events("write-start", self.name)
        step = max(1, -(-len(data) // self.CHUNKS))
        for start in range(0, len(data), step):
            self.file.write(data[start : start + step])
            self.file.flush()
            time.sleep(self.seconds / self.CHUNKS)
        return len(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.__exit__(*exc)


class SlowOs:
    """runs.py's view of `os`: fdopen gives a SlowFile, replace logs the write's end."""

    def __init__(self, seconds: float, events: Events):
        self.seconds, self.events = seconds, events

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, *args, **kwargs):
        temp_name = os.readlink(f"/proc/self/fd/{fd}")
        return SlowFile(os.fdopen(fd, *args, **kwargs), final_name(temp_name), self.seconds, self.events)

    def replace(self, source, target):
        os.replace(source, target)
        self.events("write-end", Path(target).name)


def final_name(temp_path: str) -> str:
    """'.../.checkpoint-000003.pt.ab12cd.tmp' -> 'checkpoint-000003.pt' (mkstemp's naming in runs.py)."""
    name = Path(temp_path).name
    return name[1:].rsplit(".", 2)[0]


def instrument(events: Events, write_seconds: float) -> None:
    """Log phases and slow down writes, by wrapping functions of this process only."""
    runs.os = SlowOs(write_seconds, events)

    def phase(module, attribute, kind, set_round=None):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            if set_round is not None:
                events.round = set_round(*args)
            events(f"{kind}-start")
            result = original(*args, **kwargs)
            events(f"{kind}-end")
            return result

        setattr(module, attribute, wrapper)

    # `from .prepare import prepare` binds the name in the importing module (training): patch it there
    phase(training, "prepare", "prepare")
    phase(fedavg.FedAvgRun, "round", "round", set_round=lambda self, round_index: round_index)
    phase(fedavg, "client_update", "train")
    phase(training, "epoch_batches", "round", set_round=lambda n, b, seed, tag, epoch, **_: epoch)
    phase(training, "train_steps", "train")
    phase(training, "evaluate_splits", "eval")


# --------------------------------------------------------------------------- one run


def run(spec: dict) -> None:
    """The experiment spec['experiment'] under spec['results_dir'], from scratch or resumed."""
    torch.set_num_threads(1)  # the test process and this one share 2 cores; results do not depend on it
    events = Events(spec.get("events"))
    instrument(events, spec.get("write_seconds", 0.0))
    events("spawned", f"{events.started:.4f}")  # the child's time origin on the shared monotonic clock
    runner, config, checkpoint_every, _ = EXPERIMENTS[spec["experiment"]]
    ws = setup_workspace(
        profile="smoke",
        results_dir=spec["results_dir"],
        data_dir=spec["results_dir"],
        device="cpu",
        download=False,
    )
    data = ws.load_data("synthetic", 0.1, 0, TRAIN_SIZE, synthetic_test_size=TEST_SIZE)
    events("ready")
    try:
        runner(ws, data, config, checkpoint_every=checkpoint_every, save_weights=True, progress=False)
    except BaseException as error:
        events("error", f"{type(error).__name__}: {error}".replace("\n", " "))
        raise
    events("finished")


def run_dir(results_dir: str | Path, experiment: str) -> Path:
    """The folder the experiment's run writes to."""
    _, config, _, _ = EXPERIMENTS[experiment]
    ws = setup_workspace(profile="smoke", results_dir=results_dir, device="cpu", download=False)
    return ws.run(config.run_name(), config.to_dict()).dir


# --------------------------------------------------------------------------- zygote


def zygote() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["start"], request["log"])
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"pid": request["wait"], "status": os.waitstatus_to_exitcode(status)}
        print(json.dumps(reply), flush=True)


def _child(spec: dict, log: str) -> None:
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdin.close()
        run(spec)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        run(json.loads(sys.argv[1]))
