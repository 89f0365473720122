"""Pane 2: regenerate the answers with the target (start a local server or use running ones), or skip."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.widgets import Static

from eagle_tui.widgets.form import FieldRow
from eagle_tui.widgets.panes.base import Pane

URLS = "urls"  # the Select value for "use the servers listed below" (regen.launch = None)

LAUNCH_CHOICES = [
    ("start transformers serve (CPU or GPU)", "transformers"),
    ("start SGLang", "sglang"),
    ("start vLLM", "vllm"),
    ("use running servers (URLs below)", URLS),
]


class RegenPane(Pane):
    TITLE = "Regenerate"
    SECTIONS = ("regen",)
    STEPS = ("regen",)

    def compose(self) -> ComposeResult:
        yield Static("Regenerate the answers with the target, so the draft learns the target's own words",
                     classes="pane-title")
        yield FieldRow("regen.enabled", "Skip regeneration", "bool",
                       to_cfg=lambda skip: not skip, from_cfg=lambda enabled: not enabled,
                       hint="train on the dataset's answers as they are")
        yield FieldRow("regen.launch", "Server", "choice", choices=LAUNCH_CHOICES,
                       to_cfg=lambda v: None if v == URLS else v,
                       from_cfg=lambda v: URLS if v is None else v)
        yield FieldRow("regen.servers", "Server URLs", "urls", placeholder="http://host:30000, …",
                       hint="OpenAI-compatible base URLs, comma separated")
        yield FieldRow("regen.concurrency", "Concurrency", "int", hint="requests in flight")
        yield FieldRow("regen.max_new_tokens", "Max new tokens", "int")
        yield FieldRow("regen.temperature", "Temperature", "float", hint="0 = greedy")
        yield FieldRow("regen.top_p", "Top-p", "float")
        yield FieldRow("regen.seed", "Seed", "int")
        yield FieldRow("regen.turns", "Turns", "choice",
                       choices=[("last assistant turn", "last"), ("every assistant turn", "all")])
        yield FieldRow("regen.reasoning", "Reasoning", "choice",
                       choices=[("none", "none"), ("save", "save"), ("disable", "disable")])
        yield FieldRow("regen.shard_size", "Shard size", "int", hint="conversations per shard")
        yield FieldRow("regen.max_retries", "Max retries", "int")
        yield FieldRow("regen.max_failure_rate", "Max failure rate", "float",
                       hint="stop when more requests fail than this")
        yield FieldRow("regen.output_dir", "Output folder", "optstr", placeholder="WORKDIR/regen")

    def sync(self, cfg: Any) -> None:
        skipped = not cfg.regen.enabled
        for row in self.rows():
            if row.path == "regen.enabled":
                continue
            row.disabled = skipped or (row.path == "regen.servers" and cfg.regen.launch is not None)

    def why_no_run(self, cfg: Any) -> str:
        return "regeneration is skipped: switch Skip off to run it"
