"""The run store: one folder per configuration, resumable after any kill, and the grids that use them.

    <root>/runs/<name>-<config id>/
        config.json     the run's identity (everything that changes its numbers)
        lock.json       present while a process works on the run
        attempts.log    one line per start or resume: host, pid, time, code version
        checkpoint-NNNNNN.pt   the last two, each complete (atomic writes), while the run is unfinished
        metrics.csv     one row per epoch / round: deterministic values only
        timing.csv      the same rows' wall-clock seconds (never identical twice)
        model.pt        final weights, only where a later notebook needs them
        prepared.pt     the step-0 head and, for a sparse run, its calibrated masks
        summary.json    written last: its presence marks the run complete

Colab dies without warning and Drive syncs whatever it sees, so every file is
written atomically: absent or complete. metrics.csv is rewritten together with
each checkpoint, from the rows stored inside it, so after a kill it never holds
rows the checkpoint does not, and a resumed run writes exactly the file an
uninterrupted run writes (wall times live in timing.csv so this holds bit for
bit). A complete run's checkpoints are deleted, emptied first (`discard`): on Google Drive a deleted
file stays in the bin, counted against the free 15 GB, for 30 days.

A run is found by its identity alone, so a configuration that two notebooks ask for is trained
once and read by both. What an experiment is made of is recorded apart from the runs:

    <root>/grids/<experiment>.json   the runs the last execution's grid named, and its parameters

Tables read exactly those runs (`grid_runs`), never whatever the store holds.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

STAGING_DIR = ".staging"
RUNS_DIR = "runs"
GRIDS_DIR = "grids"
CHECKPOINT_FORMAT = 2  # 2: a sparse run's checkpoint holds only the entries its masks let change
KEEP_CHECKPOINTS = 2
HEARTBEAT_SECONDS = 20  # how often a holder touches lock.json (its mtime is the heartbeat)
STALE_AFTER_SECONDS = 90  # a lock whose heartbeat is older than this belongs to a dead process
UNREADABLE_LOCK_GRACE_SECONDS = 5  # an empty or half-written lock older than this was never finished


# ---------------------------------------------------------------------- atomic writes


def _staging_dir(path: Path) -> Path:
    """`<results root>/.staging` (same filesystem, so the final rename is atomic), else the file's folder.

    A results root is marked by its .staging folder, which the workspace creates.
    """
    path = Path(path).resolve()
    return next((p / STAGING_DIR for p in path.parents if (p / STAGING_DIR).is_dir()), path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers, and a kill, only ever leave the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_staging_dir(path))
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some FUSE mounts (Drive) refuse to open or fsync a directory
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    """The JSON object stored at `path`, {} if there is no file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through an in-memory buffer, then an atomic write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def discard(path: Path) -> None:
    """Delete `path`, emptied first: Google Drive moves a deleted file to its bin, where it counts against
    the quota for 30 days, and an emptied one counts for nothing there."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, 0)
    path.unlink(missing_ok=True)


def clear_staging(root: str | Path) -> None:
    """Remove leftovers of killed writes under `root/.staging`.

    A file younger than a minute is kept: another process may be writing it.
    """
    for leftover in (Path(root) / STAGING_DIR).glob("*.tmp"):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
            if time.time() - leftover.stat().st_mtime > 60:
                leftover.unlink()


# ---------------------------------------------------------------------- CSV


def rows_to_csv(rows: list[dict]) -> bytes:
    """CSV bytes, columns in order of first appearance, floats by repr (exact); b"" for no rows."""
    if not rows:
        return b""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([columns, *([_cell(row.get(c)) for c in columns] for row in rows)])
    return buffer.getvalue().encode()


def _cell(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv joined with timing.csv on their shared row keys (empty if absent)."""
    run_dir = Path(run_dir)
    metrics = _read_csv(run_dir / "metrics.csv")
    timing = _read_csv(run_dir / "timing.csv")
    keys = [c for c in timing.columns if c in metrics.columns]
    return metrics.merge(timing, on=keys, how="left") if keys else metrics


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


# ---------------------------------------------------------------------- runs


def config_id(config: dict) -> str:
    """A short, stable hash of a JSON-serialisable config."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def wall_clock() -> float:
    """Seconds on a monotonic clock (a function of its own, so tests can fake the time)."""
    return time.monotonic()


class CheckpointSchedule:
    """When a run writes a checkpoint after an epoch or round.

    every: a checkpoint every `every` epochs / rounds; None: by wall time, once `minutes` have passed
    since the start or the last checkpoint, so a kill loses at most that much work. The last epoch or
    round writes none: the run finishes right after it.
    """

    def __init__(self, every: int | None, minutes: float):
        self.every, self.seconds = every, minutes * 60
        self.last = wall_clock()

    def due(self, step: int) -> bool:
        """Whether step `step` (counted from 1) ends with a checkpoint; the wall-time clock restarts."""
        if self.every is not None:
            return step % self.every == 0
        now = wall_clock()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


@dataclass
class Checkpoint:
    """What a run needs to continue: its progress, training state and logged rows."""

    step: int
    state: dict
    rows: list[dict]  # metrics.csv up to this step
    timing: list[dict]  # timing.csv up to this step


class Run:
    """One run directory. Use as a context manager to hold its lock while writing.

    root: the results root of a profile (e.g. results/full); the run lives in <root>/runs/.
    name: a human-readable prefix; the config hash makes the folder unique.
    config: the run's identity; a different config is a different run.
    code_version: the git commit (or package version) of this process, not part of the identity. Every
        attempt records it in attempts.log and in its checkpoints; resuming work that other code started
        is refused unless `allow_code_change`.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        config: dict,
        *,
        code_version: str = "unknown",
        allow_code_change: bool = False,
    ):
        self.root = Path(root)
        self.code_version = code_version
        self.allow_code_change = allow_code_change
        self.config = json.loads(json.dumps(config))  # plain JSON types, detached from the caller
        self.dir = self.root / RUNS_DIR / f"{name}-{config_id(self.config)}"
        self._lock: RunLock | None = None

    @property
    def is_complete(self) -> bool:
        return is_complete(self.dir)

    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    def metrics(self) -> pd.DataFrame:
        return read_metrics(self.dir)

    def __enter__(self) -> "Run":
        # config.json needs no lock: written once, atomically, its bytes follow from the folder's name
        stored = self.dir / "config.json"
        if not stored.is_file():  # the code version is recorded beside the identity, not part of it
            atomic_write_json(stored, {**self.config, "code_version": self.code_version})
        elif {k: v for k, v in read_json(stored).items() if k != "code_version"} != self.config:
            raise RuntimeError(f"{stored} holds another config than this run's; refusing to mix them")
        clear_staging(self.root)  # safe beside other writers: it keeps files younger than a minute
        lock = RunLock(self.dir / "lock.json")
        lock.acquire()
        self._lock = lock
        if self.is_complete:  # another process finished it while this one was on its way: it reads it back
            return self
        self._check_code_version()
        with open(self.dir / "attempts.log", "a") as log:  # one line per start or resume: who trained it
            log.write(
                f"{socket.gethostname()} pid {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                f"code {self.code_version}\n"
            )
        return self

    def _check_code_version(self) -> None:
        """Refuse to resume a run whose stored work (checkpoints, prepared.pt) other code made, and let go of
        its lock."""
        started = self._checkpoints() or self.has_artifact("prepared.pt")
        if not started or self.allow_code_change:
            return
        made = self.last_code_version()
        if made != self.code_version:
            self.__exit__()
            raise CodeVersionChanged(
                f"{self.dir} was started by code {made or 'of an unknown version'} and this is code "
                f"{self.code_version}: resuming it would mix two versions in one run. Set "
                "allow_code_change=True to continue it anyway (attempts.log records the change), or "
                "choose a new results_dir"
            )

    def last_code_version(self) -> str | None:
        """The code version of the run's last attempt (attempts.log), None if it recorded none."""
        log = self.dir / "attempts.log"
        lines = log.read_text().splitlines() if log.is_file() else []
        if not lines:
            return None
        _, marker, version = lines[-1].rpartition(" code ")
        return version if marker else None

    def __exit__(self, *exc) -> None:
        self._lock.release()
        self._lock = None

    def _require_lock(self) -> None:
        if self._lock is None:
            raise RuntimeError("open the run with `with run:` before writing to it")

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a checkpoint and the metrics it covers, then keep only the last two."""
        self._require_lock()
        # every draw of the package comes from seeded generators; the global one is insurance
        payload = {
            "format": CHECKPOINT_FORMAT,
            **vars(checkpoint),
            "rng": {"torch": torch.get_rng_state()},
            "code_version": self.code_version,
        }
        atomic_torch_save(payload, self.dir / f"checkpoint-{checkpoint.step:06d}.pt")
        self._write_metrics(checkpoint.rows, checkpoint.timing)
        for old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
            discard(old)

    def load_checkpoint(self, map_location="cpu") -> Checkpoint | None:
        """The newest readable checkpoint, or None. Unreadable ones are reported and skipped.

        With the lock held (a resume), metrics.csv and timing.csv are rewritten
        to hold exactly the rows of the checkpoint returned (removed if None),
        so rows of rounds that will run again never appear twice.
        """
        checkpoint = None
        for path in reversed(self._checkpoints()):
            try:
                payload = torch.load(path, map_location=map_location, weights_only=True)
                if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                    raise ValueError(f"not a fedta checkpoint of format {CHECKPOINT_FORMAT}")
                torch.set_rng_state(payload["rng"]["torch"])
                checkpoint = Checkpoint(payload["step"], payload["state"], payload["rows"], payload["timing"])
                break
            except Exception as error:  # truncated, garbage, or written by something else
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
                    "falling back to the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self._lock is None:  # read-only use: never write without the lock
            return checkpoint
        if checkpoint is None:
            for name in ("metrics.csv", "timing.csv"):
                (self.dir / name).unlink(missing_ok=True)
        else:
            self._write_metrics(checkpoint.rows, checkpoint.timing)
        return checkpoint

    def _checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("checkpoint-*.pt"))

    def _write_metrics(self, rows: list[dict], timing: list[dict]) -> None:
        atomic_write_bytes(self.dir / "metrics.csv", rows_to_csv(rows))
        atomic_write_bytes(self.dir / "timing.csv", rows_to_csv(timing))

    def save_artifact(self, name: str, obj) -> None:
        """torch.save `obj` as <run>/<name> atomically (final weights, masks, heads)."""
        self._require_lock()
        atomic_torch_save(obj, self.dir / name)

    def load_artifact(self, name: str):
        return torch.load(self.dir / name, map_location="cpu", weights_only=True)

    def has_artifact(self, name: str) -> bool:
        return (self.dir / name).is_file()

    def finish(self, summary: dict, rows: list[dict], timing: list[dict]) -> None:
        """Write the final metrics and summary.json (marks completion), then drop checkpoints."""
        self._require_lock()
        self._write_metrics(rows, timing)
        atomic_write_json(self.dir / "summary.json", summary)
        self._delete_checkpoints()

    def remove_leftover_checkpoints(self) -> None:
        """Delete checkpoints a complete run still holds (a kill between summary.json and their deletion).

        Each can be ~170 MB on Drive. Skipped if another process holds the run.
        """
        if not self.is_complete or not self._checkpoints():
            return
        if self._lock is not None:  # this process holds the run already
            self._delete_checkpoints()
            return
        with contextlib.suppress(RunLockedError), self:
            self._delete_checkpoints()

    def _delete_checkpoints(self) -> None:
        for path in self._checkpoints():
            discard(path)


# ---------------------------------------------------------------------- grids


def grid_path(root: str | Path, experiment: str) -> Path:
    return Path(root) / GRIDS_DIR / f"{experiment}.json"


def read_grid(root: str | Path, experiment: str) -> dict:
    """The last recorded grid of `experiment` ({} before its first execution)."""
    return read_json(grid_path(root, experiment))


def record_grid(root: str | Path, experiment: str, runs: list[Run], params: dict) -> list[str]:
    """Record that `experiment` is now made of `runs`, with the parameters that built them.

    Returns the complete runs that earlier executions of `experiment` named and this one does not
    (another lr, other seeds): they stay in the store, and the record keeps them under "earlier",
    but no table reads them.
    """
    names = list(dict.fromkeys(run.dir.name for run in runs))
    before = read_grid(root, experiment)
    named_before = before.get("runs", []) + before.get("earlier", [])
    earlier = [name for name in dict.fromkeys(named_before) if name not in names]
    record = {"params": params, "runs": names, "earlier": earlier}
    atomic_write_json(grid_path(root, experiment), record)
    return [name for name in earlier if is_complete(Path(root) / RUNS_DIR / name)]


def grid_runs(root: str | Path, experiment: str) -> list[Path]:
    """The folders of the complete runs of `experiment`'s recorded grid, in grid order."""
    names = read_grid(root, experiment).get("runs", [])
    folders = [Path(root) / RUNS_DIR / name for name in names]
    return [folder for folder in folders if is_complete(folder)]


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


# ---------------------------------------------------------------------- lock


class RunLockedError(RuntimeError):
    """Another live process is working on this run directory."""


class CodeVersionChanged(RuntimeError):
    """A run's stored work was made by other code than this process runs."""


class RunLock:
    """lock.json: created exclusively, refreshed by a heartbeat, taken over when its holder is dead.

    A second Colab tab on the same Drive folder is the case this guards. The
    holder is dead when, on this host, its pid is not alive; on any host, when
    its heartbeat stopped more than STALE_AFTER_SECONDS ago.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(8).hex()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def holder(self) -> tuple[dict, float | None]:
        """The lock's content ({} if empty or half-written) and mtime (None if absent), read from one file."""
        try:
            with open(self.path) as file:
                text, mtime = file.read(), os.fstat(file.fileno()).st_mtime
        except FileNotFoundError:
            return {}, None
        with contextlib.suppress(ValueError):
            return json.loads(text), mtime
        return {}, mtime

    def acquire(self) -> None:
        """Create lock.json, or take over a stale one; RunLockedError while a live process holds it."""
        for _ in range(5):
            if self._create():
                self._thread.start()
                return
            holder, mtime = self.holder()
            if mtime is None:  # released meanwhile
                continue
            who = f"pid {holder.get('pid')} on {holder.get('host')}"
            if not _is_stale(holder, time.time() - mtime):
                raise RunLockedError(
                    f"{self.path.parent} is in use by {who} (started {holder.get('started')}). Wait for "
                    "it to finish; a dead holder's lock is taken over at once on its host, "
                    f"from another host {STALE_AFTER_SECONDS} s after its last heartbeat."
                )
            if self._claim(f"{holder.get('token')}:{mtime!r}"):
                self.path.unlink(missing_ok=True)
                warnings.warn(
                    f"taking over a stale lock on {self.path.parent} ({who})", RuntimeWarning, stacklevel=3
                )
        raise RunLockedError(f"{self.path.parent}: its lock keeps changing hands; is another process on it?")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, only if it is still ours (after acquire)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.holder()[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Exclusive create of lock.json; a kill mid-write leaves an empty file (see _is_stale)."""
        return _create_new(
            self.path,
            json.dumps(
                {
                    "token": self.token,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ),
        )

    def _claim(self, stale: str) -> bool:
        """Exclusively create a marker named after one stale lock (token and mtime): one process wins it.

        Only the winner deletes that lock, so of any number of processes that
        found it stale, exactly one takes over. The marker stays in .staging
        (cleared after a minute), so a late one cannot delete the new lock.
        """
        name = hashlib.sha1(f"{self.path.resolve()}:{stale}".encode()).hexdigest()[:16]
        return _create_new(_staging_dir(self.path) / f".{self.path.name}.{name}.takeover.tmp")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # taken over meanwhile (we were judged dead)
                os.utime(self.path)


def _create_new(path: Path, text: str = "") -> bool:
    """Create `path` holding `text` unless it exists (mode "x": O_CREAT | O_EXCL); whether this call did."""
    try:
        with open(path, "x") as file:
            file.write(text)
    except FileExistsError:
        return False
    return True


def _is_stale(holder: dict, age: float) -> bool:
    """Whether a lock with this content, last touched `age` seconds ago, belongs to a dead process."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(holder.get("pid"), 0)
        except ProcessLookupError:  # its process is gone
            return True
        except (PermissionError, TypeError):  # alive as another user; no pid stored
            pass
    return age > (STALE_AFTER_SECONDS if holder else UNREADABLE_LOCK_GRACE_SECONDS)
