"""The run dashboard: one job at a time (switch with [ and ]), redrawn from the App's `JobState`s.

Leaving it (escape) never stops the job: jobs belong to the App. `c` cancels: SIGINT to the job's
process group, so eagle stops at a shard / step boundary with its manifest written (resumable).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Static

from eagle_tui.jobs import JobState
from eagle_tui.widgets.curves import Curves
from eagle_tui.widgets.progress import ShardBars, StageProgress, stage_list, summary_text

STATUS_STYLE = {"running": "bold cyan", "starting": "cyan", "cancelling": "bold yellow",
                "finished": "bold green", "failed": "bold red", "cancelled": "bold yellow"}


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("escape,w", "app.pop_screen", "Wizard"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("left_square_bracket", "switch(-1)", "Prev job"),
        Binding("right_square_bracket", "switch(1)", "Next job"),
        Binding("question_mark,f1", "app.help", "Help"),
    ]

    def __init__(self, job_id: int | None = None) -> None:
        super().__init__(id="dashboard")
        self.job_id = job_id
        self._log_seen = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="dash"):
            yield Static(id="job-title", classes="job-title")
            yield Static(id="job-stages")
            yield StageProgress(id="stage-progress")
            with Horizontal(id="dash-middle"):
                yield ShardBars(id="shards")
                with Vertical(id="curves-box"):
                    yield Static("Training curves", classes="box-title")
                    yield Curves(id="curves")
            yield Static(id="job-summary")
            yield RichLog(id="job-log", max_lines=2000, wrap=True, markup=False, highlight=False)
        yield Footer()

    @property
    def job(self) -> JobState | None:
        jobs = self.app.jobs.jobs
        if self.job_id not in jobs:
            latest = self.app.jobs.latest()
            self.job_id = latest.id if latest else None
        return jobs.get(self.job_id) if self.job_id is not None else None

    def on_mount(self) -> None:
        self.redraw(full=True)

    def on_screen_resume(self) -> None:
        self.redraw(full=True)

    def job_changed(self, job_id: int) -> None:
        if job_id == self.job_id or self.job_id is None:
            self.redraw()

    def redraw(self, full: bool = False) -> None:
        job = self.job
        log = self.query_one("#job-log", RichLog)
        if full:
            log.clear()
            self._log_seen = 0
        if job is None:
            self.query_one("#job-title", Static).update(Text("No jobs yet: press ctrl+r on a wizard pane to run "
                                                             "its step.", style="italic"))
            return
        title = Text(f"{job.title}  ", style="bold")
        title.append(job.status, style=STATUS_STYLE.get(job.status, ""))
        if job.pipeline is not None and job.pipeline.total:
            title.append(f"  · step {min(job.pipeline.done + 1, job.pipeline.total)}/{job.pipeline.total}"
                         if job.active else f"  · {job.pipeline.done}/{job.pipeline.total} steps done")
        if job.pgid:
            title.append(f"  · process group {job.pgid}", style="dim")
        if job.rc is not None:
            title.append(f"  · exit code {job.rc}", style="dim")
        title.append(f"  · failures {job.failures}", style="red" if job.failures else "dim")
        if len(self.app.jobs.jobs) > 1:
            title.append(f"  ([ ] switch between {len(self.app.jobs.jobs)} jobs)", style="dim")
        self.query_one("#job-title", Static).update(title)
        self.query_one("#job-stages", Static).update(stage_list(job.stages, job.steps))
        stage = job.stages.get(job.current) if job.current else None
        self.query_one(StageProgress).show(stage)
        self.query_one(ShardBars).show(stage)
        train = job.stages.get("train")
        if train is not None and train.metrics:
            self.query_one(Curves).show(train.metrics)
        summary = Text()
        done = job.pipeline if job.pipeline is not None and job.pipeline.summary else stage
        if done is not None and done.summary and done.status == "finished":
            summary.append("Summary\n" if done is job.pipeline else f"{done.name} summary\n", style="bold green")
            summary.append_text(summary_text(done.summary, pipeline=done is job.pipeline))
        if job.error:
            summary.append(f"error: {job.error}\n", style="bold red")
        self.query_one("#job-summary", Static).update(summary)
        new = job.log_seq - self._log_seen
        if new > 0:
            for style, line in list(job.log)[-min(new, len(job.log)):]:
                log.write(Text(line, style=style))
            self._log_seen = job.log_seq

    async def action_cancel_job(self) -> None:
        job = self.job
        if job is not None and job.active:
            self.notify(f"Cancelling {job.title}: SIGINT to its process group")
            # the App owns the worker: leaving the dashboard must not abandon a cancel half-way
            self.app.run_worker(self.app.jobs.cancel(job.id), group="cancel", exit_on_error=False)

    def action_switch(self, delta: int) -> None:
        ids = sorted(self.app.jobs.jobs)
        if not ids:
            return
        i = ids.index(self.job_id) if self.job_id in ids else 0
        self.job_id = ids[(i + delta) % len(ids)]
        self.query_one(Curves).reset()
        self.redraw(full=True)
