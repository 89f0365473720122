"""`?` / F1: every key the wizard and the dashboard understand."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = [
    ("Wizard", [
        ("ctrl+n / ctrl+b", "next / back pane (Next says why when it is disabled)"),
        ("tab / shift+tab", "move between fields"),
        ("ctrl+r", "run this pane's step (asks to resume when earlier work exists)"),
        ("ctrl+a", "run every remaining step of the pipeline"),
        ("ctrl+s / ctrl+o", "save the config as YAML / open one (same file `eagle run` reads)"),
        ("ctrl+l", "show the run dashboard"),
        ("ctrl+t", "measure the target's speed (for time estimates; runs in a subprocess)"),
        ("? / F1", "this help"),
        ("ctrl+q", "quit (asks first while a job runs)"),
    ]),
    ("Dashboard", [
        ("c", "cancel the job (stops its process group; resumable)"),
        ("[ / ]", "previous / next job"),
        ("escape / w", "back to the wizard (the job keeps running)"),
    ]),
    ("Dialogs", [
        ("r / s / escape", "resume prompt: Resume / Start over / Cancel"),
        ("y / escape", "confirm: yes / no (no is the default)"),
    ]),
]


def keys_table() -> Table:
    t = Table(box=None, show_header=False, padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    for section, keys in KEYS:
        t.add_row(f"[bold]{section}[/]", "")
        for k, what in keys:
            t.add_row(k, what)
        t.add_row("", "")
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help-dialog"):
            yield Static("Keys", classes="dialog-title")
            yield Static(keys_table())
            yield Static("escape closes this help", classes="dim")
