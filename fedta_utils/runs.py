"""Run directories: one folder per (experiment, config), resumable after any kill.

    <root>/<experiment>/<name>-<config id>/
        config.json     the run's identity (everything that changes its numbers)
        lock.json       present while a process works on the run
        checkpoint-NNNNNN.pt   the last two, each complete (atomic writes)
        metrics.csv     one row per epoch / round: deterministic values only
        timing.csv      the same rows' wall-clock seconds (never identical twice)
        model.pt        final weights, only where a later notebook needs them
        masks.pt        calibrated masks of a sparse run (bit-packed)
        summary.json    written last: its presence marks the run complete

metrics.csv is rewritten, atomically, together with each checkpoint and from
the rows stored inside it, so after a kill it never holds rows the checkpoint
does not, and a resumed run rewrites exactly the file an uninterrupted run
writes. Wall times live in timing.csv so that this equality is bit for bit.
A complete run's checkpoints are deleted: a ViT-S/16 checkpoint with
optimizer state is ~170 MB and free Drive holds 15 GB.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .storage import atomic_torch_save, atomic_write_bytes, atomic_write_json, clear_staging, staging_dir_for

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2
HEARTBEAT_SECONDS = 20
STALE_AFTER_SECONDS = 90  # a lock whose heartbeat is older than this belongs to a dead process
UNREADABLE_LOCK_GRACE_SECONDS = 5  # an unreadable lock older than this was never finished


class RunLockedError(RuntimeError):
    """Another live process is working on this run directory."""


def config_id(config: dict) -> str:
    """A short, stable hash of a JSON-serialisable config."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


@dataclass
class Checkpoint:
    """What a run needs to continue: its progress, training state and logged rows."""

    step: int
    state: dict
    rows: list[dict] = field(default_factory=list)
    timing: list[dict] = field(default_factory=list)


class Run:
    """One run directory. Use as a context manager to hold its lock while writing.

    root: the results root of a profile (e.g. results/full).
    experiment: a folder per experiment (e.g. 'fedavg_heterogeneity').
    name: a human-readable prefix; the config hash makes the folder unique.
    config: the run's identity; a different config is a different run.
    """

    def __init__(self, root: str | Path, experiment: str, name: str, config: dict):
        self.root = Path(root)
        self.experiment = experiment
        self.config = json.loads(json.dumps(config))  # plain JSON types, detached from the caller
        self.dir = self.root / experiment / f"{name}-{config_id(self.config)}"
        self._lock: _RunLock | None = None

    # ------------------------------------------------------------------ status
    @property
    def is_complete(self) -> bool:
        return (self.dir / "summary.json").is_file()

    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    def metrics(self) -> pd.DataFrame:
        return read_metrics(self.dir)

    # ------------------------------------------------------------------ lock
    def __enter__(self) -> "Run":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _RunLock(self.dir / "lock.json")
        self._lock.acquire()
        try:
            self._write_or_check_config()
            clear_staging(self.root)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _write_or_check_config(self) -> None:
        path = self.dir / "config.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != self.config:
                raise RuntimeError(f"{path} holds another config than this run's; refusing to mix them")
            return
        atomic_write_json(path, self.config)

    def _require_lock(self) -> None:
        if self._lock is None:
            raise RuntimeError("open the run with `with run:` before writing to it")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a checkpoint and the metrics it covers, then keep only the last two."""
        self._require_lock()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": checkpoint.step,
            "state": checkpoint.state,
            "rows": checkpoint.rows,
            "timing": checkpoint.timing,
            "rng": _rng_states(),
        }
        atomic_torch_save(payload, self._checkpoint_path(checkpoint.step))
        self._write_metrics(checkpoint.rows, checkpoint.timing)
        for old in self._checkpoint_paths()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def load_checkpoint(self, map_location="cpu") -> Checkpoint | None:
        """The newest readable checkpoint, or None. Unreadable ones are reported and skipped.

        With the lock held (a resume), metrics.csv and timing.csv are rewritten
        to hold exactly the rows of the checkpoint returned (removed if None),
        so rows of rounds that will run again never appear twice.
        """
        for path in reversed(self._checkpoint_paths()):
            try:
                payload = torch.load(path, map_location=map_location, weights_only=True)
                _check_payload(payload)
            except Exception as error:  # truncated, garbage, or written by something else
                warnings.warn(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
                              "falling back to the previous one", RuntimeWarning, stacklevel=2)
                continue
            _restore_rng_states(payload["rng"])
            checkpoint = Checkpoint(payload["step"], payload["state"], payload["rows"], payload["timing"])
            self._sync_metrics(checkpoint)
            return checkpoint
        self._sync_metrics(None)
        return None

    def _sync_metrics(self, checkpoint: Checkpoint | None) -> None:
        if self._lock is None:  # read-only use: never write without the lock
            return
        if checkpoint is None:
            for name in ("metrics.csv", "timing.csv"):
                (self.dir / name).unlink(missing_ok=True)
            return
        metrics, timing = self.dir / "metrics.csv", self.dir / "timing.csv"
        if (not metrics.is_file() or metrics.read_bytes() != rows_to_csv(checkpoint.rows)
                or not timing.is_file() or timing.read_bytes() != rows_to_csv(checkpoint.timing)):
            self._write_metrics(checkpoint.rows, checkpoint.timing)

    def _checkpoint_path(self, step: int) -> Path:
        return self.dir / f"checkpoint-{step:06d}.pt"

    def _checkpoint_paths(self) -> list[Path]:
        return sorted(self.dir.glob("checkpoint-*.pt"))

    # ------------------------------------------------------------------ artefacts
    def save_artifact(self, name: str, obj) -> None:
        """torch.save `obj` as <run>/<name> atomically (final weights, masks, heads)."""
        self._require_lock()
        atomic_torch_save(obj, self.dir / name)

    def load_artifact(self, name: str, map_location="cpu"):
        return torch.load(self.dir / name, map_location=map_location, weights_only=True)

    def has_artifact(self, name: str) -> bool:
        return (self.dir / name).is_file()

    def finish(self, summary: dict, rows: list[dict], timing: list[dict]) -> None:
        """Write the final metrics and summary.json (marks completion), then drop checkpoints."""
        self._require_lock()
        self._write_metrics(rows, timing)
        atomic_write_json(self.dir / "summary.json", summary)
        for path in self._checkpoint_paths():
            path.unlink(missing_ok=True)

    def remove_leftover_checkpoints(self) -> None:
        """Delete checkpoints a complete run still holds (a kill between summary.json and their deletion).

        Each can be ~170 MB on Drive. Skipped if another process holds the run.
        """
        if not self.is_complete or not self._checkpoint_paths():
            return
        try:
            with self:
                for path in self._checkpoint_paths():
                    path.unlink(missing_ok=True)
        except RunLockedError:
            pass

    def _write_metrics(self, rows: list[dict], timing: list[dict]) -> None:
        atomic_write_bytes(self.dir / "metrics.csv", rows_to_csv(rows))
        atomic_write_bytes(self.dir / "timing.csv", rows_to_csv(timing))


# ---------------------------------------------------------------------- CSV

def rows_to_csv(rows: list[dict]) -> bytes:
    """CSV bytes with columns in order of first appearance; floats written with repr (exact)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buffer.getvalue().encode("utf-8")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv joined with timing.csv on their shared row keys (empty if absent)."""
    run_dir = Path(run_dir)
    metrics_path, timing_path = run_dir / "metrics.csv", run_dir / "timing.csv"
    if not metrics_path.is_file() or metrics_path.stat().st_size == 0:
        return pd.DataFrame()
    metrics = pd.read_csv(metrics_path)
    if not timing_path.is_file() or timing_path.stat().st_size == 0:
        return metrics
    timing = pd.read_csv(timing_path)
    keys = [c for c in timing.columns if c in metrics.columns]
    return metrics.merge(timing, on=keys, how="left") if keys else metrics


# ---------------------------------------------------------------------- RNG

def _rng_states() -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(_numpy_state_from_plain(states["numpy"]))
    random.setstate(_python_state_from_plain(states["python"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_to_plain(state) -> list:
    kind, keys, position, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain) -> tuple:
    kind, keys, position, has_gauss, cached = plain
    return (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached)


def _python_state_to_plain(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(plain) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


def _check_payload(payload) -> None:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a fedta checkpoint of format 1")
    for key in ("step", "state", "rows", "timing", "rng"):
        if key not in payload:
            raise ValueError(f"checkpoint lacks {key!r}")


# ---------------------------------------------------------------------- lock

class _RunLock:
    """lock.json: created exclusively, refreshed by a heartbeat, taken over when stale.

    A lock is stale when its process is gone (same host, pid not alive) or its
    heartbeat stopped more than STALE_AFTER_SECONDS ago (another host, e.g. a
    Colab VM that died with Drive mounted).
    """

    def __init__(self, path: Path):
        self.path = path
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Create lock.json, or take over a stale one; RunLockedError while a live process holds it.

        A stale lock is moved aside (an atomic rename) and checked to be the
        one judged stale before it is deleted; then the exclusive create is
        tried again. Of two processes that take over the same stale lock, one
        creates the new lock and the other finds it held: never two holders.
        """
        for _ in range(5):
            if self._create_exclusively():
                break
            holder = self._read_holder()
            if not self._is_stale(holder):
                raise RunLockedError(
                    f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(started {holder.get('started')}). Wait for it to finish; if that process is gone, "
                    f"the lock is taken over automatically {STALE_AFTER_SECONDS} s after its last heartbeat.")
            if self._remove_stale(holder):
                warnings.warn(f"taking over a stale lock on {self.path.parent} "
                              f"(pid {holder.get('pid')} on {holder.get('host')})", RuntimeWarning, stacklevel=3)
        else:
            raise RunLockedError(f"{self.path.parent}: could not take over its lock; another process "
                                 "keeps creating it. Make sure only one process runs this experiment.")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _remove_stale(self, holder: dict) -> bool:
        """Delete the lock file if it still is the stale `holder`'s; False if it was not."""
        aside = self._scratch_name("stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process removed it first
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") == holder.get("token"):
            aside.unlink(missing_ok=True)
            return True
        try:  # a live lock created in between: put it back unless yet another one exists
            os.link(aside, self.path)
        except FileExistsError:
            pass
        except OSError:  # no hard links (some FUSE mounts)
            os.replace(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read_holder()
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _content(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _create_exclusively(self) -> bool:
        """Publish a complete lock file under self.path unless one exists (link fails if it does).

        Where hard links are not supported, fall back to an exclusive create
        and write, which a kill can leave empty (handled by _is_stale).
        """
        draft = self._scratch_name("new")
        with open(draft, "w") as file:
            json.dump(self._content(), file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(draft, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return self._create_and_write()
        finally:
            draft.unlink(missing_ok=True)

    def _scratch_name(self, purpose: str) -> Path:
        """A unique name beside the results root's other temporary files (cleared by clear_staging)."""
        staging = staging_dir_for(self.path)
        return staging / f".{self.path.name}.{os.getpid()}.{time.time_ns()}.{purpose}.tmp"

    def _create_and_write(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            json.dump(self._content(), file)
            file.flush()
            os.fsync(file.fileno())
        return True

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _is_stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if not holder:  # empty or half-written: its writer died within the write
            return age > UNREADABLE_LOCK_GRACE_SECONDS
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return True
        return age > STALE_AFTER_SECONDS

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
