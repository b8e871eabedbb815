"""Checks, before any work is done, that a file or directory reldl is asked to write can be written there.

Each raises a one-line ProgrammingError that starts with the caller's `label` (e.g. "CREATE MODEL m: path") and
names the path, instead of an OSError traceback after minutes of training. The checks look, they create nothing.
Kernel pseudo-file systems (/proc, /sys, /dev) are refused whatever `os.access` says: as root it says "writable".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from reldl.errors import ProgrammingError


def _resolved(label: str, path: str | os.PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, an embedded NUL, no home directory
        raise ProgrammingError(f"{label} {str(path)!r} is not a usable path ({e})") from None


# file systems that hold no files of ours (the kernel's views, device nodes); tmpfs (/dev/shm, /run) is a real one
PSEUDO_FS = frozenset(
    {"proc", "sysfs", "devtmpfs", "devfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs"}
    | {"pstore", "bpf", "configfs", "efivarfs", "binfmt_misc", "mqueue", "fusectl", "hugetlbfs", "nsfs"}
)
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")  # by path too: in a container /dev is often a tmpfs
REAL_UNDER_PSEUDO = ("/dev/shm",)


def _under(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip("/") + "/")


def _mount_types() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount this process sees (Linux); [] where that is unknown."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split(" - ", 1)
        left, right = fields[0].split(), fields[1].split() if len(fields) == 2 else []
        if len(left) >= 5 and right:  # mount points escape spaces and the like as octal (\040)
            mounts.append((re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), left[4]), right[0]))
    return mounts


def pseudo_fs(path: str | os.PathLike) -> str | None:
    """The kernel pseudo-file system holding the resolved `path` (its type, e.g. "proc", or one of PSEUDO_ROOTS), or
    None for a real one. Checked by the mount's type and, for /proc, /sys and /dev, by the path."""
    p = str(path)
    mounts = [(m, t) for m, t in _mount_types() if _under(p, m)]
    if mounts:
        fs = max(mounts, key=lambda mount: len(mount[0]))[1]
        if fs in PSEUDO_FS:
            return fs
    if any(_under(p, r) for r in REAL_UNDER_PSEUDO):
        return None
    return next((r for r in PSEUDO_ROOTS if _under(p, r)), None)


def refuse_pseudo_fs(label: str, p: Path) -> None:
    """A one-line error when the resolved `p` is on a pseudo-file system (`pseudo_fs`)."""
    fs = pseudo_fs(p)
    if fs:
        raise ProgrammingError(f"{label} {str(p)!r} is on a kernel pseudo-file system ({fs}), which cannot hold files")


def _exists(label: str, p: Path) -> bool:
    try:
        return p.exists()
    except OSError as e:  # e.g. a parent that cannot be searched
        raise ProgrammingError(f"{label} {str(p)!r} cannot be accessed ({e.strerror or e})") from None


def _writable(p: Path) -> bool:
    return os.access(p, os.W_OK | os.X_OK)


def _why_not_creatable(label: str, p: Path) -> str | None:
    """Why the missing `p` could not be made (with any missing parents), or None if it could."""
    above = p.parent
    while not _exists(label, above):
        above = above.parent
    if not above.is_dir():
        return f"{str(above)!r} is not a directory"
    if not _writable(above):
        return f"{str(above)!r} is not writable"
    return None


def _dir(label: str, path: str | os.PathLike, empty: bool) -> Path:
    """`path` resolved: an existing writable directory (empty, if `empty`; `new_dir` refuses any existing non-directory
    too) or a missing one that can be created."""
    p = _resolved(label, path)
    refuse_pseudo_fs(label, p)
    if not _exists(label, p):
        why = _why_not_creatable(label, p)
        if why:
            raise ProgrammingError(f"{label} {str(p)!r} cannot be created: {why}")
        return p
    if empty:
        try:
            occupied = not p.is_dir() or any(p.iterdir())
        except OSError as e:
            raise ProgrammingError(f"{label} {str(p)!r} cannot be read ({e.strerror or e})") from None
        if occupied:
            raise ProgrammingError(f"{label} {str(p)!r} exists and is not an empty directory")
    elif not p.is_dir():
        raise ProgrammingError(f"{label} {str(p)!r} is not a directory")
    if not _writable(p):
        raise ProgrammingError(f"{label} {str(p)!r} is not writable")
    return p


def new_dir(label: str, path: str | os.PathLike) -> Path:
    """`path` resolved, where a new model's files may go: missing (and creatable) or an empty writable directory.
    Anything else is refused, so that no file already there is ever overwritten."""
    return _dir(label, path, empty=True)


def work_dir(label: str, path: str | os.PathLike) -> Path:
    """`path` resolved, a directory to work in: an existing writable directory (its files may be replaced), or a
    missing one that can be created."""
    return _dir(label, path, empty=False)


def output_file(label: str, path: str | os.PathLike) -> Path:
    """`path` resolved, a file to (over)write: not a directory, in an existing writable directory."""
    p = _resolved(label, path)
    refuse_pseudo_fs(label, p)
    if _exists(label, p):
        if p.is_dir():
            raise ProgrammingError(f"{label} {str(p)!r} is a directory")
        if not os.access(p, os.W_OK):
            raise ProgrammingError(f"{label} {str(p)!r} is not writable")
        return p
    parent = p.parent
    if not _exists(label, parent):
        raise ProgrammingError(f"{label} {str(p)!r} cannot be written: directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ProgrammingError(f"{label} {str(p)!r} cannot be written: {str(parent)!r} is not a directory")
    if not _writable(parent):
        raise ProgrammingError(f"{label} {str(p)!r} cannot be written: directory {str(parent)!r} is not writable")
    return p
