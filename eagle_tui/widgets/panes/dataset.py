"""Pane 1: the target model, the work directory and the chat dataset (with preview and bad-row report)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Static

from eagle_tui.widgets.form import FieldRow
from eagle_tui.widgets.panes.base import Pane

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PREVIEW_ROWS = 5
PREVIEW_CHECK_LIMIT = 2000  # rows read for the bad-row report when the config sets no limit


def _looks_local(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or Path(s).suffix in DATA_SUFFIXES or s.count("/") > 1


def check_source(text: str) -> str | None:
    s = text.strip()
    if not s:
        return "give a file, a folder, a hub dataset name, or demo"
    if s == "demo":
        return None
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file() and p.suffix not in DATA_SUFFIXES:
            return f"{p.suffix or 'this'} file is not supported: use .json, .jsonl or .parquet"
        return None
    if _looks_local(s) or not HUB_RE.match(s):
        return f"no such file or folder: {s}"
    return None


def describe_source(text: str) -> str:
    s = text.strip()
    if s == "demo":
        return "embedded ShareGPT (offline)"
    p = Path(s).expanduser()
    if p.is_file():
        return f"local {p.suffix[1:]} file, {_size(p.stat().st_size)}"
    if p.is_dir():
        return "local folder (parquet shards or save_to_disk)"
    return "hub dataset name (needs network or a local HF cache)"


def check_target(text: str) -> str | None:
    s = text.strip()
    if not s:
        return "give a model folder, a hub id, or demo"
    if s == "demo":
        return None
    p = Path(s).expanduser()
    if p.is_dir():
        return None if (p / "config.json").exists() else f"{s} has no config.json: not a model folder"
    if p.exists():
        return f"{s} is a file: give the model's folder"
    if _looks_local(s) or not HUB_RE.match(s) or "/" not in s:
        return f"no such model folder: {s}"
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class DatasetPane(Pane):
    TITLE = "Dataset"
    SECTIONS = ("target", "dataset", "workdir")

    def compose(self) -> ComposeResult:
        yield Static("Target model and chat dataset", classes="pane-title")
        yield FieldRow("target.model", "Target model", check=check_target,
                       hint="demo = embedded SmolLM2-135M-Instruct; or a folder / hub id")
        yield FieldRow("target.device", "Device", "choice",
                       choices=[("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda")])
        yield FieldRow("workdir", "Work directory", hint="every step writes under it")
        yield FieldRow("dataset.source", "Dataset", check=check_source,
                       hint="a .json/.jsonl/.parquet file, a folder, a hub name, or demo")
        with Horizontal(classes="button-row"):
            yield Button("Browse…", id="browse-source", compact=True)
            yield Button("Preview", id="preview", compact=True)
        yield FieldRow("dataset.split", "Split", "optstr", placeholder="all", hint="e.g. train[:1000]")
        yield FieldRow("dataset.messages_column", "Messages column", "optstr", placeholder="auto",
                       hint="found automatically when empty")
        yield FieldRow("dataset.limit", "Limit", "optint", placeholder="all",
                       hint="use at most this many conversations")
        yield FieldRow("dataset.shuffle_seed", "Shuffle seed", "optint", placeholder="no shuffle")
        yield FieldRow("dataset.strict", "Strict", "bool", hint="stop at the first bad row")
        yield FieldRow("dataset.heldout", "Held out", "optint", placeholder="selection + eval prompts",
                       hint="reserved before anything trains; never trained on")
        yield Static("Press Preview to read the first conversations and the bad-row report.",
                     id="preview-area", classes="preview")

    def sync(self, cfg: Any) -> None:
        row = self.query_one("#f-dataset-source", FieldRow)
        if row.error is None:
            row.hint = describe_source(cfg.dataset.source)
            row.show_hint()

    @on(Button.Pressed, "#browse-source")
    def _browse(self) -> None:
        from eagle_tui.screens.pick_path import PathPicker

        def chosen(path: str | None) -> None:
            if path:
                self.query_one("#f-dataset-source-control").value = path

        self.app.push_screen(PathPicker("Choose a dataset file or folder",
                                        self.app.config.dataset.source), chosen)

    @on(Button.Pressed, "#preview")
    def action_preview(self) -> None:
        cfg = self.app.config
        row = self.query_one("#f-dataset-source", FieldRow)
        if row.error:
            self._show(Text(f"Cannot preview: {row.error}", style="bold red"))
            return
        self._show(Text(f"Reading {cfg.dataset.source} …", style="italic"))
        d = cfg.dataset
        limit = min(d.limit, PREVIEW_CHECK_LIMIT) if d.limit else PREVIEW_CHECK_LIMIT
        self._load(dict(source=d.source, split=d.split, messages_column=d.messages_column,
                        limit=limit, strict=False))

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def _load(self, spec_kwargs: dict[str, Any]) -> None:
        try:
            from core.data import DataSpec, load_conversations

            source = spec_kwargs["source"]
            if source == "demo":
                from core.assets import demo_dataset

                spec_kwargs["source"] = str(demo_dataset())
            convs, report = load_conversations(DataSpec(**spec_kwargs))
            self.app.call_from_thread(self._loaded, source, report.rows_in_source,
                                      render_preview(convs, report, source))
        except Exception as e:  # shown in the pane: a bad dataset must not crash the wizard
            self.app.call_from_thread(self._show, Text(f"Cannot read the dataset: {e}", style="bold red"))

    def _loaded(self, source: str, rows: int, body: Any) -> None:
        """Show the preview, then let the budget count the dataset's real size instead of an assumption."""
        self._show(body)
        self.app.known_rows[source] = rows
        self.screen.refresh_state()

    def _show(self, body: Any) -> None:
        self.query_one("#preview-area", Static).update(body)


def render_preview(convs: list, report: Any, source: str) -> Table | Text:
    """The first conversations as a table, then the bad-row report (counts by reason, first rows)."""
    table = Table(title=f"{report.rows_in_source} rows in {os.path.basename(str(source)) or source}; "
                  f"{len(convs)} good conversations in the first {report.rows_read} rows read",
                  expand=True, title_justify="left")
    table.add_column("#", justify="right", width=5)
    table.add_column("turns", justify="right", width=5)
    table.add_column("first user message", ratio=1, no_wrap=True)
    table.add_column("first answer", ratio=1, no_wrap=True)
    for c in convs[:PREVIEW_ROWS]:
        user = next((m["content"] for m in c.messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in c.messages if m["role"] == "assistant"), "")
        table.add_row(str(c.index), str(len(c.messages)), _one_line(user), _one_line(answer))
    bad = list(_bad_rows(report))
    out = Table.grid(expand=True)
    out.add_row(table)
    if not bad:
        out.add_row(Text("No bad rows.", style="green"))
        return out
    counts = _counts(report, bad)
    out.add_row(Text(f"{len(bad)} bad rows skipped: "
                     + ", ".join(f"{n} {reason}" for reason, n in counts.items()), style="bold yellow"))
    for index, reason, detail in bad[:5]:
        out.add_row(Text(f"  row {index}: {reason}" + (f" ({detail})" if detail else ""), style="yellow"))
    return out


def _one_line(s: str, n: int = 60) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _bad_rows(report: Any):
    rows = report.bad_rows
    for r in rows:
        yield r.index, r.reason, _one_line(r.detail, 70)


def _counts(report: Any, bad: list) -> dict[str, int]:
    return dict(report.counts)
