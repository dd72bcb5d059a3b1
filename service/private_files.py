"""Private files: what the service keeps (results, heatmap overlays of camera images, thresholds) is readable by its
own user only, whatever the process umask says.

* Directories the service creates for its files are made 0700. Existing directories are left as they are: the
  results file may live in a shared folder such as /tmp, whose mode is not ours to change.
* Files are created 0600, and an existing file is tightened to 0600 when opened (a store created by an older
  version stays world-readable otherwise). A file owned by someone else keeps its mode (chmod would fail).
* SQLite creates its `-wal` and `-shm` files with the database file's mode, so creating the database file 0600
  first covers them; `private_sqlite` also tightens any that already exist.

Plain functions, no dependencies: the results store, the thresholds file and any later database code use them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "private_dir", "private_file", "open_private", "private_sqlite"]


def private_dir(path: str | os.PathLike) -> Path:
    """Create `path` and any missing parents with mode 0700; existing directories are not changed."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=PRIVATE_DIR_MODE)
            os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def _tighten(path: Path) -> None:
    with contextlib.suppress(PermissionError, FileNotFoundError):
        if path.stat().st_mode & 0o077:
            os.chmod(path, PRIVATE_FILE_MODE)


def private_file(path: str | os.PathLike) -> Path:
    """Make sure `path` exists as a 0600 file (created empty if missing, its folder with `private_dir`)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
    os.close(fd)
    _tighten(path)
    return path


def open_private(path: str | os.PathLike, mode: str = "w") -> IO:
    """Open a new file for writing with mode 0600 from the start (never visible with wider permissions); fails if
    it exists. For the temporary file of an atomic replace."""
    if not any(c in mode for c in "wxa") or "+" in mode:
        raise ValueError(f"open_private creates files for writing, not {mode!r}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    return os.fdopen(fd, mode.replace("x", "w"))


def private_sqlite(path: str | os.PathLike) -> Path:
    """Create (or tighten) a SQLite database file and its side files (-wal, -shm, -journal) as 0600."""
    path = private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        _tighten(path.with_name(path.name + suffix))
    return path
