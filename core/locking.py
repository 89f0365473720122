"""One writer per output folder: an OS lock on `<folder>/.eagle.lock`.

The lock is `flock(LOCK_EX)` on a small file inside the folder. The kernel drops it when the
holding process exits, however it exits (kill -9 included), so a dead run never leaves a stale
lock; the file itself stays (it holds only the last holder's pid and command line, for the
message) and counts as nothing when a folder is checked for earlier output.

A process holds a folder's lock from the moment it prepares the folder until it exits (a
per-process registry makes taking it again a no-op: tests and the pipeline run stages over and
over in one process). `held()` scopes it instead, and `release()` gives it back early, for
library users that write a folder and then hand it to another process.

Readers (the TUI's resume prompt, `export --check`, eval) never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from core.errors import UsageError

LOCK_FILE = ".eagle.lock"

_HELD: dict[str, int] = {}  # resolved lock-file path -> open fd holding the flock


class FolderLockedError(UsageError):
    """Another live process is writing the folder (exit code 2: choose another folder or wait)."""

    def __init__(self, folder: str, holder: str):
        super().__init__(f"{folder} is being written by another process ({holder})",
                         hint="wait for it to finish or stop it, or choose another folder; "
                              "two writers would mix their outputs")
        self.folder, self.holder = folder, holder


def lock_path(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> Path:
    return Path(lock_file) if lock_file is not None else Path(folder) / LOCK_FILE


def beside(path: str | os.PathLike) -> Path:
    """The lock file for an output that appears whole (a report file, an export folder renamed
    into place): `.NAME.eagle.lock` next to it."""
    p = Path(path).absolute()
    return p.parent / f".{p.name}{LOCK_FILE}"


def _key(path: Path) -> str:
    return str(path.resolve())


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info.get('host', '?')}: {info.get('command', '?')}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


def _command() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name in ("eagle", "eagle-tui"):  # the console script: say it as the user typed it
        cmd = shlex.join([name, *sys.argv[1:]])
    else:
        cmd = shlex.join(getattr(sys, "orig_argv", None) or sys.argv)
    return cmd if len(cmd) <= 300 else cmd[:299] + "…"


def acquire(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None,
            attempts: int = 3) -> bool:
    """Take the folder's lock (creating the folder); True if taken now, False if this process
    already held it. Raises FolderLockedError naming the holder."""
    path = lock_path(folder, lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _key(path)
    if key in _HELD:
        return False
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    for i in range(attempts):  # a reader probing with LOCK_SH holds it for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if i == attempts - 1:
                holder = _describe(os.pread(fd, 4096, 0))
                os.close(fd)
                raise FolderLockedError(str(folder), holder) from None
            time.sleep(0.02)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": round(time.time(), 3)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = fd
    return True


def is_held(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> bool:
    """Whether this process holds the folder's lock."""
    return _key(lock_path(folder, lock_file)) in _HELD


def release(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> None:
    """Give the lock back (the file stays; see the module docstring). No-op if not held."""
    fd = _HELD.pop(_key(lock_path(folder, lock_file)), None)
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file drops the flock


@contextlib.contextmanager
def held(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold the lock for a block; a lock this process already held stays held afterwards."""
    new = acquire(folder, lock_file)
    try:
        yield
    finally:
        if new:
            release(folder, lock_file)


def holder(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> str | None:
    """Who is writing the folder now ("pid N on HOST: COMMAND"), or None. For readers such as
    the TUI: probes with a shared lock, creates nothing."""
    path = lock_path(folder, lock_file)
    if not path.exists():
        return None
    if _key(path) in _HELD:
        return f"pid {os.getpid()} (this process)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)
