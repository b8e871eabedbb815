"""Directories reldl makes for the life of this process, removed when it exits.

A model trained in an in-memory database is registered in that database's catalog, which dies with the process, so
its files (a temporary directory reldl picked) can never be named again once the process ends; without this, every
such model left a directory in the temp folder for good. The same holds for the Java wrapper Spark is started with.
Paths the user chose are never registered here, and a directory that a database file's catalog registers (`keep`,
from `catalog.put_model`) is kept.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

_DIRS: list[tuple[int, Path]] = []  # (the process that made it, the directory)
_LOCK = threading.Lock()


def process_dir(prefix: str) -> Path:
    """A new temporary directory, removed at this process's exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    remove_at_exit(path)
    return path


_REGISTERED = False


def remove_at_exit(path: str | os.PathLike) -> None:
    """Remove ``path`` (if it exists then) when this process exits; a forked child removes only its own."""
    global _REGISTERED
    with _LOCK:
        if not _REGISTERED:
            atexit.register(_cleanup)
            _REGISTERED = True
        _DIRS.append((os.getpid(), Path(path).resolve()))


def keep(path: str | os.PathLike) -> None:
    """A catalog that outlives the process (a database file) registered ``path``: the directory holding it stays."""
    p = Path(path).resolve()
    with _LOCK:
        _DIRS[:] = [(pid, d) for pid, d in _DIRS if not (p == d or d in p.parents)]


def _cleanup() -> None:
    me = os.getpid()
    with _LOCK:
        mine = [d for pid, d in _DIRS if pid == me]
        _DIRS[:] = [(pid, d) for pid, d in _DIRS if pid != me]
    for d in mine:
        shutil.rmtree(d, ignore_errors=True)
