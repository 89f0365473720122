"""Modal dialogs: resume prompt, confirmation, budget warning before a run."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from core.manifest import MANIFEST, load_manifest
from eagle_tui.widgets.estimates import fmt_bytes


@dataclass
class ExistingWork:
    """What a step's output directory already holds (for the resume prompt)."""

    step: str
    path: Path
    manifest: Any | None  # core.manifest.Manifest, or None when files exist without one
    files: int = 0
    size: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        return self.manifest is not None and self.error is None


def find_existing_work(step: str, path: Path) -> ExistingWork | None:
    """None for a missing or empty output; otherwise what is there (never raises)."""
    from core.locking import LOCK_FILE
    from core.manifest import has_output

    if not path.is_dir() or not has_output(path):
        return None
    files = [p for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    work = ExistingWork(step, path, None, len(files), sum(p.stat().st_size for p in files))
    if (path / MANIFEST).exists():
        try:
            work.manifest = load_manifest(path)
        except Exception as e:  # corrupt manifest: say so; only Start over can fix it
            work.error = str(e)
    else:
        work.error = f"no {MANIFEST}: not an eagle output, cannot resume"
    return work


def describe_work(w: ExistingWork) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    t.add_row("folder", str(w.path))
    t.add_row("on disk", f"{w.files} files, {fmt_bytes(w.size)}")
    if w.error:
        t.add_row("problem", Text(w.error, style="red"))
    m = w.manifest
    if m is not None:
        samples = sum(int(s.get("samples", 0)) for s in m.shards)
        t.add_row("kind", f"{m.kind} (format {m.format_version})")
        t.add_row("state", Text("complete", style="green") if m.complete
                  else Text("unfinished: can be resumed", style="yellow"))
        if m.shards or not (w.path / "checkpoints").is_dir():
            t.add_row("shards done", f"{len(m.shards)} ({samples} samples)")
        ckpts = sorted((p.name for p in (w.path / "checkpoints").glob("step-*") if p.is_dir()),
                       key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)
        if ckpts:  # a training run resumes from its newest checkpoint
            t.add_row("checkpoints", ", ".join(ckpts[-4:]) + "  (resumes from the newest)")
        if m.created:
            t.add_row("started", time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created)))
        for k, v in list(m.extra.items())[:6]:
            t.add_row(k, _short(v))
        settings = ", ".join(f"{k}={_short(v)}" for k, v in sorted(m.settings.items()))
        t.add_row("settings", settings or "-")
    return t


def _short(v: Any, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


class ResumeScreen(ModalScreen[str]):
    """Resume / Start over / Cancel for earlier work; dismisses with "resume", "restart" or "cancel".

    Start over asks a second time (ConfirmScreen) before anything is deleted.
    """

    BINDINGS = [Binding("escape", "choose('cancel')", "Cancel"), Binding("r", "choose('resume')", "Resume"),
                Binding("s", "start_over", "Start over")]

    def __init__(self, works: list[ExistingWork]) -> None:
        super().__init__()
        self.works = works

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="resume-dialog"):
            yield Static("Earlier work found", classes="dialog-title")
            for w in self.works:
                yield Static(Text(f"{w.step}", style="bold cyan"))
                yield Static(describe_work(w), classes="work")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Resume", id="resume", variant="primary",
                             disabled=not all(w.resumable for w in self.works))
                yield Button("Start over…", id="restart", variant="warning")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        first = self.query_one("#resume" if all(w.resumable for w in self.works) else "#cancel", Button)
        first.focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "restart":
            self.action_start_over()
        else:
            self.action_choose(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        if choice == "resume" and not all(w.resumable for w in self.works):
            return
        self.dismiss(choice)

    def action_start_over(self) -> None:
        paths = "\n".join(f"  {w.path}  ({w.files} files, {fmt_bytes(w.size)})" for w in self.works)

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.dismiss("restart")

        self.app.push_screen(ConfirmScreen(f"Delete everything in:\n{paths}\nand start over?",
                                           yes="Delete and start over", danger=True), confirmed)


def delete_work(works: list[ExistingWork]) -> None:
    """Called only after the user confirmed Start over."""
    for w in works:
        shutil.rmtree(w.path)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "answer(False)", "No"), Binding("y", "answer(True)", "Yes")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel", danger: bool = False) -> None:
        super().__init__()
        self.question, self.yes, self.no, self.danger = question, yes, no, danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm-dialog"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, id="yes", variant="error" if self.danger else "primary")
                yield Button(self.no, id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class BudgetWarningScreen(ConfirmScreen):
    """Shown before starting a step whose budget does not fit."""

    def __init__(self, steps: list[str], problems: list[str]) -> None:
        text = f"{', '.join(steps)} may not fit on this machine:\n" + "\n".join(f"  ✗ {p}" for p in problems)
        super().__init__(text + "\n\nStart it anyway?", yes="Run anyway", danger=True)
