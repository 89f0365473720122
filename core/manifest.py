"""Output directories that are resumable and safe (design.md rule 3).

Every output directory holds `manifest.json`: the format version, the content settings (and their
hash), per-shard records (file, sample count, sha256) and free-form extra fields. Files are written
to a temporary name and `os.replace`d, so a crash never leaves a half-written file under its final
name. `prepare_output_dir` applies the refusal rules: a non-empty directory without `resume` is
refused; `resume` with different content settings is refused naming the differing fields. It also
takes the folder's writer lock (core.locking) first, so the rules are checked by the one writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core import locking
from core.errors import CorruptDataError, OutputExistsError, SettingsMismatchError, UsageError

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def target_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """A model folder by content, so a moved one keeps its outputs: the hash of config.json and of
    the weight files' names and sizes (hashing 16 GB of weights on every resume is too slow)."""
    path = Path(path)
    weights = sorted((f.name, f.stat().st_size) for f in path.iterdir()
                     if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))
    cfg = json.loads((path / "config.json").read_text())
    return {"config_hash": settings_hash(cfg), "weights_hash": settings_hash({"files": weights})}


def has_output(directory: str | os.PathLike) -> bool:
    """True if the folder holds anything besides our writer-lock file."""
    d = Path(directory)
    return d.is_dir() and any(p.name != locking.LOCK_FILE for p in d.iterdir())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and `os.replace` it into place.
    A full disk is re-raised as an OSError naming `path` (writers such as pyarrow and
    safetensors name no file); the temporary file is removed either way."""
    from core.disk import naming_full_disk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_full_disk(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


@dataclass
class Manifest:
    kind: str  # "regen", "cache", "train", "export", ...
    format_version: int
    settings: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    created: float = field(default_factory=time.time)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": self.format_version,
                "settings": self.settings, "settings_hash": self.settings_hash,
                "shards": self.shards, "extra": self.extra, "complete": self.complete,
                "created": self.created}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        return cls(kind=d["kind"], format_version=d["format_version"], settings=d["settings"],
                   shards=d.get("shards", []), extra=d.get("extra", {}),
                   complete=d.get("complete", False), created=d.get("created", 0.0))

    def save(self, directory: str | os.PathLike) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    def add_shard(self, directory: str | os.PathLike, file: str, samples: int, **info: Any) -> dict:
        rec = {"file": file, "samples": samples,
               "sha256": sha256_file(Path(directory) / file), **info}
        self.shards = [s for s in self.shards if s["file"] != file] + [rec]
        self.shards.sort(key=lambda s: s["file"])
        return rec

    def verify_shard(self, directory: str | os.PathLike, rec: dict[str, Any]) -> None:
        p = Path(directory) / rec["file"]
        if not p.exists():
            raise CorruptDataError(f"{p}: shard listed in {MANIFEST} is missing")
        if sha256_file(p) != rec["sha256"]:
            raise CorruptDataError(f"{p}: checksum mismatch (truncated or modified shard)",
                                   hint="delete the shard and re-run with --resume to rebuild it")


def load_manifest(directory: str | os.PathLike, kind: str | None = None) -> Manifest | None:
    p = Path(directory) / MANIFEST
    if not p.exists():
        return None
    m = Manifest.from_dict(read_json(p))
    if kind is not None and m.kind != kind:
        raise UsageError(f"{directory} holds a '{m.kind}' output, not '{kind}'")
    return m


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = set(old) | set(new)
    return {k: (old.get(k), new.get(k)) for k in keys
            if canonical_json(old.get(k)) != canonical_json(new.get(k))}


def prepare_output_dir(directory: str | os.PathLike, kind: str, format_version: int,
                       settings: dict[str, Any], resume: bool) -> tuple[Manifest, bool]:
    """Apply the refusal rules and return (manifest, resumed).

    Without `resume`, any non-empty directory is refused. With `resume`, the stored content
    settings must equal `settings`; otherwise the differing fields are named. The folder's writer
    lock is taken first and kept until the process exits (core.locking); a folder of someone
    else's files (no manifest, no lock file) is refused without leaving a lock file in it.
    """
    d = Path(directory)
    if not has_output(d) or (d / MANIFEST).exists() or locking.lock_path(d).exists():
        locking.acquire(d)
    existing = load_manifest(d) if d.exists() else None
    non_empty = has_output(d)
    if existing is not None and resume:
        if existing.kind != kind:
            raise UsageError(f"{d} holds a '{existing.kind}' output, not '{kind}'")
        if existing.format_version != format_version:
            raise UsageError(f"{d} was written with format version {existing.format_version}; "
                             f"this version writes {format_version}", hint="use a new output directory")
        diff = diff_settings(existing.settings, settings)
        if diff:
            raise SettingsMismatchError(str(d), diff)
        return existing, True
    if non_empty:
        what = "earlier output (manifest.json)" if existing else "files"
        raise OutputExistsError(f"{d} already holds {what}",
                                hint="pass --resume to continue it, or choose an empty directory")
    d.mkdir(parents=True, exist_ok=True)
    m = Manifest(kind=kind, format_version=format_version, settings=settings)
    m.save(d)
    return m, False
