"""Progress is data: small typed events emitted by long stages to a sink.

The CLI prints them as JSON lines (`--events jsonl`) or draws progress bars; the TUI reads the JSON
lines of `eagle ... --events jsonl` subprocesses. `event_from_dict` is the inverse of `to_dict`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Protocol, TextIO


@dataclass
class Event:
    kind: ClassVar[str] = "event"
    stage: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["event"] = self.kind
        return d


@dataclass
class StageStarted(Event):
    kind: ClassVar[str] = "stage_started"
    total: int | None = None  # units of work expected (samples, steps, shards), if known
    unit: str = "samples"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress(Event):
    kind: ClassVar[str] = "progress"
    done: int = 0
    total: int | None = None
    unit: str = "samples"
    rate: float | None = None  # units per second
    eta_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tokens_per_s, failed


@dataclass
class ShardDone(Event):
    kind: ClassVar[str] = "shard_done"
    shard: int = 0
    samples: int = 0
    path: str = ""
    shards_done: int = 0
    shards_total: int | None = None


@dataclass
class SampleFailed(Event):
    kind: ClassVar[str] = "sample_failed"
    index: int = -1
    reason: str = ""


@dataclass
class StepMetrics(Event):
    kind: ClassVar[str] = "step_metrics"
    step: int = 0
    split: str = "train"  # or "val"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    step: int = 0
    path: str = ""


@dataclass
class Log(Event):
    kind: ClassVar[str] = "log"
    level: str = "info"
    message: str = ""


@dataclass
class StageFinished(Event):
    kind: ClassVar[str] = "stage_finished"
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageFailed(Event):
    kind: ClassVar[str] = "stage_failed"
    message: str = ""
    exit_code: int = 1


EVENT_TYPES: dict[str, type[Event]] = {
    c.kind: c for c in (StageStarted, Progress, ShardDone, SampleFailed, StepMetrics,
                        CheckpointSaved, Log, StageFinished, StageFailed)
}


def event_from_dict(d: dict[str, Any]) -> Event:
    cls = EVENT_TYPES[d["event"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class EventSink(Protocol):
    def __call__(self, event: Event) -> None: ...


class NullSink:
    def __call__(self, event: Event) -> None:
        pass


class ListSink:
    """Collects events (tests, summaries)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, cls)]


class JsonlSink:
    """One JSON object per line, flushed at once so a reading process sees it live."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        d = event.to_dict()
        d["t"] = round(time.time(), 3)
        line = json.dumps(d, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class CallbackSink:
    def __init__(self, fn: Callable[[Event], None]) -> None:
        self.fn = fn

    def __call__(self, event: Event) -> None:
        self.fn(event)


class RateMeter:
    """Throughput and ETA over a run, for Progress events."""

    def __init__(self, total: int | None = None, already_done: int = 0) -> None:
        self.start = time.monotonic()
        self.total = total
        self.base = already_done

    def rate(self, done: int) -> float | None:
        dt = time.monotonic() - self.start
        n = done - self.base
        return n / dt if dt > 0 and n > 0 else None

    def eta(self, done: int) -> float | None:
        r = self.rate(done)
        if r is None or self.total is None:
            return None
        return max(0.0, (self.total - done) / r)
