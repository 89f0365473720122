"""Disk space: checked before a heavy step, and a full disk said plainly when it happens anyway.

`check_free` refuses a step whose estimate exceeds the free space at its destination, with the
numbers. `EAGLE_IGNORE_DISK_CHECK=1` skips the check: the CLI's `--ignore-disk-check` sets it, so
torchrun workers and the steps of `eagle run` see it too. An ENOSPC during a write is turned into
`DiskFullError` (file, free space); the CLI adds the command that resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from core.errors import EagleError

IGNORE_ENV = "EAGLE_IGNORE_DISK_CHECK"
IGNORE_HINT = "--ignore-disk-check to try anyway"


class DiskSpaceError(EagleError):
    """Not enough free space for a step (exit code 1). `during_run`: the step had started, so
    its folder holds work to resume."""

    def __init__(self, message: str, path: str, free: int, needed: int | None = None,
                 hint: str | None = None, during_run: bool = False):
        super().__init__(message, hint)
        self.path, self.free, self.needed, self.during_run = path, free, needed, during_run


class DiskFullError(DiskSpaceError):
    """ENOSPC while writing `path`; whatever was finished before is kept and resumable."""

    def __init__(self, path: str, free: int, where: str, named: bool = True):
        what = path if named else f"a file under {path}"
        super().__init__(f"no space left on device writing {what} ({fmt_bytes(free)} free on {where})",
                         path, free, hint="free some space, then resume", during_run=True)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def ignored() -> bool:
    return os.environ.get(IGNORE_ENV, "") not in ("", "0")


def free_at(path: str | os.PathLike) -> tuple[str, int]:
    """(nearest existing folder, bytes free there for an unprivileged writer)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        p = p.parent
    st = os.statvfs(p)
    return str(p), st.f_bavail * st.f_frsize


def bytes_under(path: str | os.PathLike) -> int:
    """Bytes of the files under a folder (0 if missing): work already written there."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def check_free(where: str | os.PathLike, needed: int, what: str, *, during_run: bool = False) -> None:
    """Refuse if `needed` bytes do not fit at `where` (unless EAGLE_IGNORE_DISK_CHECK is set)."""
    if ignored() or needed <= 0:
        return
    at, free = free_at(where)
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space for {what}: needs about {fmt_bytes(needed)}, "
            f"{fmt_bytes(free)} free at {at}", str(where), free, needed, during_run=during_run,
            hint=("free some space, then resume with --resume" if during_run else
                  "free some space or choose a folder on another disk") + f"; {IGNORE_HINT}")


def is_full_disk(exc: BaseException) -> bool:
    """ENOSPC, also when a library (pyarrow, safetensors) wraps it in its own message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def first_full_disk(exc: BaseException) -> BaseException | None:
    """The earliest ENOSPC in an exception's chain that names its file (cleanup after the first
    one may fail again, on another file), else the earliest at all."""
    named = bare = None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_full_disk(e):
            bare = e
            if getattr(e, "filename", None):
                named = e
        e = e.__cause__ or e.__context__
    return named or bare


def full_disk_error(exc: BaseException, default_path: str | os.PathLike) -> DiskFullError:
    e = first_full_disk(exc) or exc
    named = getattr(e, "filename", None)
    path = named or str(default_path)
    where, free = free_at(path)
    return DiskFullError(str(path), free, mount_point(where), named=bool(named))


@contextlib.contextmanager
def raising_disk_full(default_path: str | os.PathLike) -> Iterator[None]:
    """A stage's entry: any full disk inside the block (this process, or a worker's report) leaves
    as DiskFullError naming the file (else `default_path`) and the free space."""
    try:
        yield
    except Exception as e:
        if first_full_disk(e) is not None and not isinstance(e, DiskSpaceError):
            raise full_disk_error(e, default_path) from e
        raise


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the file system holding `path` (what a user frees space on)."""
    p = Path(path).absolute()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full disk inside the block as OSError(ENOSPC) naming `path`."""
    try:
        yield
    except BaseException as e:
        if is_full_disk(e) and not getattr(e, "filename", None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
