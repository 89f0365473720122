"""A path prompt with a folder tree: for the dataset, and for opening / saving the YAML config."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Static

from eagle_tui.widgets.form import FormInput


class PathPicker(ModalScreen["str | None"]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, title: str, initial: str = "", root: str | None = None,
                 must_exist: bool = False) -> None:
        super().__init__()
        self.title_text, self.initial, self.must_exist = title, initial, must_exist
        start = Path(initial).expanduser()
        base = start if start.is_dir() else start.parent if start.parent.is_dir() else Path.cwd()
        self.root = root or str(base.resolve())

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="path-dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield FormInput(self.initial, id="path-input", placeholder="path")
            yield Static("", id="path-error", classes="field-hint -error")
            yield DirectoryTree(self.root, id="path-tree")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Use", id="use", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#path-input").focus()

    @on(DirectoryTree.FileSelected)
    @on(DirectoryTree.DirectorySelected)
    def _picked(self, event) -> None:
        self.query_one("#path-input", FormInput).value = str(event.path)

    @on(FormInput.Submitted)
    @on(Button.Pressed, "#use")
    def _use(self) -> None:
        value = self.query_one("#path-input", FormInput).value.strip()
        if not value:
            return
        if self.must_exist and not Path(value).expanduser().exists():
            self.query_one("#path-error", Static).update(f"no such file: {value}")
            return
        self.dismiss(value)

    @on(Button.Pressed, "#cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss(None)
