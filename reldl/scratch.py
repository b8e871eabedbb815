"""Directories reldl makes for the life of this process, removed when it exits.

A model trained in an in-memory database is registered in that database's catalog, which dies with the process, so
its files (a temporary directory reldl picked) can never be named again once the process ends; without this, every
such model left a directory in the temp folder for good. The same holds for the Java wrapper Spark is started with.
Paths the user chose are never registered here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

_DIRS: list[Path] = []
_LOCK = threading.Lock()
_OWNER = os.getpid()


def process_dir(prefix: str) -> Path:
    """A new temporary directory, removed at this process's exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    remove_at_exit(path)
    return path


def remove_at_exit(path: str | os.PathLike) -> None:
    """Remove ``path`` (if it exists then) when this process exits; a forked child never removes its parent's."""
    with _LOCK:
        if not _DIRS:
            atexit.register(_cleanup)
        _DIRS.append(Path(path))


def _cleanup() -> None:
    if os.getpid() != _OWNER:
        return
    with _LOCK:
        dirs, _DIRS[:] = list(_DIRS), []
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
