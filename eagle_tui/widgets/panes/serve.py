"""Pane 5: measure the draft (acceptance length), export it and show the SGLang / vLLM command."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from eagle_tui.widgets import estimates
from eagle_tui.widgets.form import FieldRow
from eagle_tui.widgets.panes.base import Pane


class ServePane(Pane):
    TITLE = "Evaluate & Serve"
    SHORT = "Eval & Serve"
    SECTIONS = ("eval", "export", "serve")
    STEPS = ("eval", "export")

    def compose(self) -> ComposeResult:
        yield Static("Measure the acceptance length, export, and serve", classes="pane-title")
        yield FieldRow("eval.enabled", "Evaluate", "bool", hint="speculative decoding against the target")
        yield FieldRow("eval.num_prompts", "Prompts", "int")
        yield FieldRow("eval.num_draft_tokens", "Draft tokens", "int",
                       hint="proposed per verification step")
        yield FieldRow("eval.max_new_tokens", "Max new tokens", "int")
        yield FieldRow("eval.compare_k", "Compare k", "list", placeholder="e.g. 1,2",
                       hint="other draft lengths measured on the same prompts")
        yield FieldRow("export.format", "Export format", "choice", choices=[
            ("SGLang / vLLM (EAGLE-3 checkpoint)", "sglang"), ("speculators", "speculators")])
        yield FieldRow("export.output_dir", "Export folder", "optstr", placeholder="WORKDIR/export")
        yield FieldRow("serve.engine", "Serving engine", "choice", choices=[("SGLang", "sglang"), ("vLLM", "vllm")])
        yield FieldRow("serve.num_steps", "Speculative steps", "int")
        yield FieldRow("serve.topk", "Speculative top-k", "int")
        yield FieldRow("serve.num_draft_tokens", "Verify tokens", "int",
                       hint="with top-k 1: steps + 1")
        yield FieldRow("serve.tp_size", "Tensor parallel", "int")
        yield FieldRow("serve.port", "Port", "int", minimum=1, maximum=65535)
        yield FieldRow("serve.bench", "Prove in vLLM", "bool",
                       hint="after export: vLLM without / with the draft, its τ vs eval's, speedup")
        yield Static(id="serve-command", classes="command")

    def sync(self, cfg: Any) -> None:
        for row in self.rows():
            if row.path.startswith("eval.") and row.path != "eval.enabled":
                row.disabled = not cfg.eval.enabled
        self.query_one("#serve-command", Static).update(serve_command_text(cfg))


ENGINE_NAMES = {"sglang": "SGLang", "vllm": "vLLM"}


def serve_command_text(cfg: Any) -> Text:
    """The chosen engine's command first, then the other engine's, both from core.serve."""
    out = Text()
    chosen = cfg.serve.engine
    for engine in (chosen, *(e for e in ENGINE_NAMES if e != chosen)):
        cmd = estimates.serve_command(cfg, engine)
        if out:
            out.append("\n\n")
        out.append(f"Serve with {ENGINE_NAMES[engine]}" + (" (chosen)" if engine == chosen else "") + ":\n",
                   style="bold")
        out.append(cmd, style="green" if not cmd.startswith("(") else "italic yellow")
    return out
