"""Atomic, durable file writes.

Colab dies without warning and Drive syncs whatever it sees, so a file under
results/ must be either absent or complete. Every write goes to a temporary
file in `<results root>/.staging/` (same filesystem, so the final rename is
atomic), is flushed and fsync'ed, then moved into place with os.replace, and
the directory entry is fsync'ed too. A kill leaves at most a stray file in
.staging/, which the next run of that results root removes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch

STAGING_DIR = ".staging"


def staging_dir_for(path: Path) -> Path:
    """The staging folder for `path`: beside the nearest results root.

    A results root is marked by a `.staging` folder (created by Workspace);
    without one, the file's own directory holds the temporary file.
    """
    for parent in Path(path).resolve().parents:
        candidate = parent / STAGING_DIR
        if candidate.is_dir():
            return candidate
    return Path(path).resolve().parent


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=staging)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through an in-memory buffer, then an atomic write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def clear_staging(root: str | Path) -> int:
    """Remove leftovers of killed writes under `root/.staging`; returns how many.

    Call only when no other process writes into `root` with the same staging
    folder's files in flight; a file younger than a minute is kept in case
    another writer is mid-write.
    """
    import time

    staging = Path(root) / STAGING_DIR
    if not staging.is_dir():
        return 0
    removed = 0
    for leftover in staging.glob("*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > 60:
                leftover.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some FUSE mounts (Drive) refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
