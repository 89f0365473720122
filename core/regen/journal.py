"""Append-only resume journal: one JSON line per finished sample.

Each line is written and flushed to the OS as soon as its sample finishes, so a `kill -9` loses
only the requests still in flight. fsync is immediate with `sync_every_s=0`, else grouped: the
runner calls `sync()` off the event loop every `sync_every_s` (a per-line fsync blocked the loop
for ~6 ms per sample on a busy disk). A power cut can then cost the last second of finished
samples, which are simply sent again: shards are rebuilt from the journal, never trusted alone.
A kill in the middle of a write can leave a torn last line: `load` drops it and truncates the file
back to the last complete line before new lines are appended. A bad line anywhere else is real corruption and is reported by line number.
The last entry for an index wins (a failed sample retried with --retry-failed).
A write that fails (a full disk) is cut back to the last whole line, so the journal stays loadable,
and the error names the file.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from core.errors import CorruptDataError

DONE, FAILED, SKIPPED = "done", "failed", "skipped"


class Journal:
    def __init__(self, path: str | os.PathLike, sync_every_s: float = 0.0):
        self.path = Path(path)
        self.sync_every_s = sync_every_s
        self._dirty = False
        self._sync_lock = threading.Lock()
        self.entries: dict[int, dict[str, Any]] = {}
        self.torn_bytes = 0  # size of a dropped torn tail, for the resume report
        self._f = None
        self._good = 0  # file size after the last whole line

    def load(self) -> dict[int, dict[str, Any]]:
        """Read existing entries, dropping (and truncating away) a torn last line."""
        self.entries = {}
        if not self.path.exists():
            return self.entries
        data = self.path.read_bytes()
        pos = good_end = lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl == -1 else nl + 1
            line, lineno = data[pos:end].strip(), lineno + 1
            if line:
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or "index" not in entry or "status" not in entry:
                        raise ValueError("not a journal entry")
                except ValueError as e:
                    if end >= len(data):
                        break  # torn tail from a kill mid-write
                    raise CorruptDataError(f"{self.path}, line {lineno}: unreadable journal entry ({e})",
                                           hint="delete the output directory and start again") from None
                self.entries[int(entry["index"])] = entry
            pos = good_end = end
        if good_end < len(data):
            self.torn_bytes = len(data) - good_end
        if good_end < len(data) or (good_end and not data[:good_end].endswith(b"\n")):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.seek(good_end)
                if good_end and not data[:good_end].endswith(b"\n"):
                    f.write(b"\n")  # a whole last entry that lost only its newline
                f.flush()
                os.fsync(f.fileno())
        return self.entries

    def open(self) -> "Journal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing behind
        self._good = os.fstat(self._f.fileno()).st_size
        return self

    def append(self, entry: dict[str, Any]) -> None:
        assert self._f is not None, "Journal.open() first"
        data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                view = view[self._f.write(view):]
        except OSError as e:
            os.ftruncate(self._f.fileno(), self._good)  # drop a partial line; needs no space
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        self._good += len(data)
        if self.sync_every_s <= 0:
            os.fsync(self._f.fileno())
        else:
            self._dirty = True
        self.entries[int(entry["index"])] = entry

    def sync(self) -> None:
        """fsync what was appended since the last sync (safe to call from another thread)."""
        with self._sync_lock:
            if self._f is not None and self._dirty:
                self._dirty = False
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._sync_lock:
            if self._f is not None:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                self._f = None

    def __enter__(self) -> "Journal":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
