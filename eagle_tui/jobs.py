"""Heavy steps as `eagle --events jsonl run CONFIG --steps ...` subprocesses, owned by the App.

Why a subprocess and not a thread: PyTorch work in a thread holds the GIL long enough to stall key
presses for seconds; a subprocess keeps the UI responsive, isolates CUDA crashes and lets torchrun own
its workers. Each job runs in its own process group (start_new_session) so Cancel can signal the whole
group (eagle, its `transformers serve`, torchrun workers) and leave resumable state behind.

`JobState.apply` folds the typed events of core.events into what a dashboard draws; the App's worker
reads stdout line by line, applies events and posts a coalescable `JobChanged` message.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from textual.message import Message

from core import events as ev
from eagle_tui.render import fmt_value

# How the TUI starts `eagle`: the interpreter running the TUI, so the same venv is used.
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-c", "from eagle_tui.cli import entry; entry()")

# Measures the target's prefill speed in a subprocess (torch never loads in the UI process).
MEASURE_CODE = (
    "import sys\n"
    "from core.budget import measure_target_tokens_per_s\n"
    "target, device, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n"
    "if target == 'demo':\n"
    "    from core.assets import demo_target\n"
    "    target = str(demo_target())\n"
    "print(measure_target_tokens_per_s(target, device=None if device == 'auto' else device,\n"
    "                                  batch_tokens=batch, seq_length=seq))\n")


async def measure_speed(target: str, device: str, batch_tokens: int, seq_length: int,
                        python: str = sys.executable) -> float:
    """Tokens per second of the target's forward pass, measured in a child process."""
    proc = await asyncio.create_subprocess_exec(
        python, "-c", MEASURE_CODE, target, device, str(batch_tokens), str(seq_length),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [l for l in err.decode(errors="replace").splitlines() if l.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return float(out.decode().strip().splitlines()[-1])


SIGINT_GRACE_S = 20.0  # eagle stops at a shard/step boundary on SIGINT and writes its manifest
SIGTERM_GRACE_S = 5.0
LOG_LINES = 2000
PIPELINE = "pipeline"  # the stage name `eagle run` reports its own progress under


@dataclass
class StageView:
    """What one stage (regen, cache, train, ...) of a job has reported so far."""

    name: str
    status: str = "running"  # running | finished | failed
    total: int | None = None
    done: int = 0
    unit: str = "samples"
    rate: float | None = None
    eta_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    shards: dict[int, int] = field(default_factory=dict)  # shard index -> samples written
    shards_total: int | None = None
    failures: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    # metric name -> [(step, value)], per split ("train" / "val")
    metrics: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    last_checkpoint: str | None = None

    @property
    def shard_size(self) -> int | None:
        for src in (self.extra, self.settings):
            v = src.get("shard_size")
            if isinstance(v, int) and v > 0:
                return v
        return None


@dataclass
class JobState:
    id: int
    steps: list[str]
    argv: list[str]
    resume: bool = False
    status: str = "starting"  # starting | running | cancelling | finished | failed | cancelled
    pid: int | None = None
    pgid: int | None = None
    rc: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    stages: dict[str, StageView] = field(default_factory=dict)
    current: str | None = None
    failure_reasons: deque = field(default_factory=lambda: deque(maxlen=50))
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    log_seq: int = 0  # total lines ever logged, so a view can append only what is new

    @property
    def title(self) -> str:
        return f"job {self.id}: {', '.join(self.steps)}"

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running", "cancelling")

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.stages.values())

    def stage(self, name: str, focus: bool = True) -> StageView:
        if name not in self.stages:
            self.stages[name] = StageView(name)
        if focus:
            self.current = name
        return self.stages[name]

    @property
    def pipeline(self) -> StageView | None:
        """`eagle run`'s own stage: steps done of steps to do, and the final summary."""
        return self.stages.get(PIPELINE)

    def add_log(self, line: str, style: str = "") -> None:
        self.log.append((style, line))
        self.log_seq += 1

    def apply(self, e: ev.Event) -> None:
        if self.status == "starting":
            self.status = "running"
        # The dashboard follows the step being run; helper stages (data reading inside regen, the
        # pipeline's own bookkeeping) update their view without stealing the focus.
        focus = e.stage != PIPELINE and (isinstance(e, ev.StageStarted) or e.stage in self.steps
                                         or self.current is None)
        s = self.stage(e.stage, focus)
        if isinstance(e, ev.StageStarted):
            s.status, s.total, s.unit, s.settings = "running", e.total, e.unit, dict(e.settings)
            self.add_log(f"▶ {e.stage} started" + (f" ({e.total} {e.unit})" if e.total else ""), "bold cyan")
        elif isinstance(e, ev.Progress):
            s.done, s.unit, s.rate, s.eta_s = e.done, e.unit, e.rate, e.eta_s
            if e.total is not None:
                s.total = e.total
            s.extra.update(e.extra)
            if isinstance(e.extra.get("failed"), int):
                s.failures = max(s.failures, e.extra["failed"])
        elif isinstance(e, ev.ShardDone):
            s.shards[e.shard] = e.samples
            if e.shards_total is not None:
                s.shards_total = e.shards_total
            self.add_log(f"shard {e.shard} done: {e.samples} samples", "green")
        elif isinstance(e, ev.SampleFailed):
            s.failures += 1
            self.failure_reasons.append((e.index, e.reason))
            self.add_log(f"sample {e.index} failed: {e.reason}", "yellow")
        elif isinstance(e, ev.StepMetrics):
            split = s.metrics.setdefault(e.split, {})
            for k, v in e.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    split.setdefault(k, []).append((e.step, float(v)))
        elif isinstance(e, ev.CheckpointSaved):
            s.last_checkpoint = e.path
            self.add_log(f"checkpoint step {e.step} → {e.path}", "green")
        elif isinstance(e, ev.Log):
            self.add_log(e.message, {"warning": "yellow", "error": "red"}.get(e.level, ""))
        elif isinstance(e, ev.StageFinished):
            s.status, s.summary = "finished", dict(e.summary)
            if s.total is not None and s.done < s.total and s.unit != "steps":
                s.done = s.total
            self.add_log(f"✔ {e.stage} finished", "bold green")
            if e.stage != PIPELINE and e.summary:
                self.add_log("  " + ", ".join(f"{k}={fmt_value(v)}" for k, v in e.summary.items()), "green")
        elif isinstance(e, ev.StageFailed):
            s.status, self.error = "failed", e.message
            self.add_log(f"✘ {e.stage} failed: {e.message}", "bold red")


class JobChanged(Message):
    """A job's state moved on (coalesced: the dashboard redraws from `JobState`)."""

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobChanged) and message.job_id == self.job_id


class JobEnded(Message):
    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in group `pgid` (zombies are dead, merely unreaped)."""
    proc = Path("/proc")
    if not proc.exists():  # not Linux: fall back to signal 0
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 2 and rest[0] != "Z" and int(rest[2]) == pgid:
            return True
    return False


class JobManager:
    """Starts, tracks and cancels step subprocesses. Owned by the App, so leaving a pane keeps runs alive."""

    def __init__(self, app, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.app = app
        self.command = list(command or DEFAULT_COMMAND)
        self.env = env
        self.jobs: dict[int, JobState] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._next_id = 1

    # ---- queries ---------------------------------------------------------------------------
    def active(self) -> list[JobState]:
        return [j for j in self.jobs.values() if j.active]

    def latest(self) -> JobState | None:
        return self.jobs[max(self.jobs)] if self.jobs else None

    def argv_for(self, config_path: str | os.PathLike, steps: Sequence[str], resume: bool) -> list[str]:
        argv = [*self.command, "--events", "jsonl", "run", str(config_path), "--steps", ",".join(steps)]
        return argv + (["--resume"] if resume else [])

    # ---- control ---------------------------------------------------------------------------
    def start(self, config_path: str | os.PathLike, steps: Sequence[str], resume: bool = False,
              argv: list[str] | None = None) -> JobState:
        job = JobState(id=self._next_id, steps=list(steps),
                       argv=argv or self.argv_for(config_path, steps, resume), resume=resume)
        self._next_id += 1
        self.jobs[job.id] = job
        self.app.run_worker(self._run(job), name=f"job-{job.id}", group="jobs",
                            exit_on_error=False)
        return job

    async def cancel(self, job_id: int, sigint_grace: float = SIGINT_GRACE_S,
                     sigterm_grace: float = SIGTERM_GRACE_S) -> None:
        """SIGINT the group (eagle saves resumable state), then SIGTERM, then SIGKILL."""
        job, proc = self.jobs.get(job_id), self._procs.get(job_id)
        if job is None or proc is None or not job.active or job.pgid is None:
            return
        job.status = "cancelling"
        job.add_log("cancelling: SIGINT sent to the process group", "yellow")
        self.app.post_message(JobChanged(job_id))
        for sig, grace in ((signal.SIGINT, sigint_grace), (signal.SIGTERM, sigterm_grace),
                           (signal.SIGKILL, 5.0)):
            _signal_group(job.pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if proc.returncode is not None and not group_alive(job.pgid):
                    return
                await asyncio.sleep(0.05)
            if sig != signal.SIGKILL:
                job.add_log(f"still running after {grace:.0f}s: escalating", "yellow")

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.cancel(j.id, sigint_grace=5.0) for j in self.active()))

    # ---- the reader ------------------------------------------------------------------------
    async def _run(self, job: JobState) -> None:
        post: Callable[[], None] = lambda: self.app.post_message(JobChanged(job.id))
        job.add_log("$ " + " ".join(job.argv[len(self.command):] if job.argv[:len(self.command)] == self.command
                                    else job.argv), "dim")
        try:
            proc = await asyncio.create_subprocess_exec(
                *job.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=1 << 24,
                env=self._child_env())
        except OSError as e:
            job.status, job.error, job.ended = "failed", f"could not start: {e}", time.time()
            job.add_log(job.error, "bold red")
            post()
            self.app.post_message(JobEnded(job.id))
            return
        self._procs[job.id] = proc
        job.pid = job.pgid = proc.pid  # a new session: the leader's pid is the group id
        job.status = "running"
        post()
        await asyncio.gather(self._read_events(job, proc.stdout, post),
                             self._read_stderr(job, proc.stderr, post))
        job.rc = await proc.wait()
        job.ended = time.time()
        if job.status == "cancelling" or job.rc in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            job.status = "cancelled"
            job.add_log("cancelled: run the step again and choose Resume to continue", "yellow")
        elif job.rc == 0:
            job.status = "finished"
        else:
            job.status = "failed"
            job.error = job.error or f"exited with code {job.rc}"
        post()
        self.app.post_message(JobEnded(job.id))

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env or {})
        return env

    async def _read_events(self, job: JobState, stream: asyncio.StreamReader, post) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if not line.strip():
                continue
            try:
                event = ev.event_from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                job.add_log(line)  # not an event: show it rather than lose it
            else:
                job.apply(event)
            post()

    async def _read_stderr(self, job: JobState, stream: asyncio.StreamReader, post) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if line:
                job.add_log(line, "red" if line.startswith("error:") else "")
                post()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
