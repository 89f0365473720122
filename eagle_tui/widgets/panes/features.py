"""Pane 3: an offline feature cache (storage options with their bytes per sample) or online training."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from eagle_tui.widgets import estimates
from eagle_tui.widgets.form import FieldRow
from eagle_tui.widgets.panes.base import Pane

OFFLINE_ONLY = ("features.aux_dtype", "features.target_store", "features.topk", "features.shard_size",
                "features.output_dir")


class FeaturesPane(Pane):
    TITLE = "Cache or Online"
    SHORT = "Cache/Online"
    SECTIONS = ("features", "vocab")
    STEPS = ("cache",)

    def compose(self) -> ComposeResult:
        yield Static("Target features: write them once to an offline cache, or compute them online "
                     "while training", classes="pane-title")
        yield FieldRow("features.mode", "Mode", "choice", choices=[
            ("offline cache (extract once)", "offline"),
            ("online (target inside training)", "online")])
        yield FieldRow("features.max_length", "Max sequence length", "int")
        yield FieldRow("vocab.draft_vocab_size", "Draft vocabulary", "optint", placeholder="auto",
                       hint="most frequent target tokens the draft predicts")
        yield FieldRow("features.aux_dtype", "Hidden states stored as", "choice",
                       choices=[("fp8 (8-bit)", "fp8"), ("bf16", "bf16"), ("fp16", "fp16")])
        yield FieldRow("features.target_store", "Target distribution", "choice", choices=[
            ("top-k probabilities", "topk"), ("full draft-vocab probabilities", "probs"),
            ("final hidden state (recompute)", "hidden")])
        yield FieldRow("features.topk", "Top-k", "int")
        yield FieldRow("features.shard_size", "Shard size", "int", hint="samples per shard")
        yield FieldRow("features.nproc", "Processes", "int")
        yield FieldRow("features.output_dir", "Output folder", "optstr", placeholder="WORKDIR/cache")
        yield Static(id="storage-table", classes="storage")

    def sync(self, cfg: Any) -> None:
        online = cfg.features.mode == "online"
        for row in self.rows():
            if row.path in OFFLINE_ONLY:
                row.disabled = online or (row.path == "features.topk" and cfg.features.target_store != "topk")
        known = getattr(self.app, "known_rows", {}).get(cfg.dataset.source)
        self.query_one("#storage-table", Static).update(storage_table(cfg, known))

    def why_no_run(self, cfg: Any) -> str:
        return "online mode writes no cache: the target runs inside training (Train pane)"


def storage_table(cfg: Any, known_rows: int | None = None) -> Any:
    if cfg.features.mode == "online":
        return Text("Online: nothing is stored; each training step runs the target forward "
                    "(GPU memory for target and draft together; see the budget panel).", style="italic")
    rows = estimates.storage_options(cfg, known_rows)
    if isinstance(rows, str):
        return Text(rows, style="italic")
    _, note = estimates.sample_count(cfg, known_rows)
    t = Table(title=f"Storage options for this target, every sample at max length; {note}",
              title_justify="left", expand=True)
    t.add_column("hidden states")
    t.add_column("target distribution")
    t.add_column("per sample", justify="right")
    t.add_column("all samples", justify="right")
    for r in rows:
        chosen = r.aux_dtype == cfg.features.aux_dtype and r.target_store == cfg.features.target_store
        style = "bold reverse" if chosen else ""
        t.add_row(r.aux_dtype, r.target_store + (f" (k={cfg.features.topk})" if r.target_store == "topk" else ""),
                  estimates.fmt_bytes(r.bytes_per_sample), estimates.fmt_bytes(r.total_bytes),
                  style=style)
    return t
