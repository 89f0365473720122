"""Dashboard pieces drawn from a `StageView`: overall bar with rate/ETA, and one bar per shard."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar as RichBar
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from eagle_tui.jobs import StageView
from eagle_tui.render import fmt_value
from eagle_tui.widgets.estimates import fmt_time

MAX_SHARD_ROWS = 12


def _rate(s: StageView) -> str:
    if s.rate is None:
        return ""
    text = f"{s.rate:.3g} {s.unit}/s"
    tps = s.extra.get("tokens_per_s")
    if isinstance(tps, (int, float)):
        text += f" · {tps:,.0f} tok/s"
    return text


class StageProgress(Static):
    """Overall progress of the current stage: bar, done/total, throughput, ETA, failures."""

    def show(self, s: StageView | None, width: int = 50) -> None:
        if s is None:
            self.update(Text("waiting for the first event…", style="italic dim"))
            return
        t = Table.grid(padding=(0, 1))
        t.add_column(width=8)
        t.add_column(width=width)
        t.add_column()
        total = s.total or 0
        finished = s.status == "finished"
        if not total and finished:  # a stage without a count (export): a full bar
            bar = RichBar(total=1, completed=1, width=width)
        else:
            bar = RichBar(total=total or None, completed=s.done, width=width,
                          pulse=not total and s.status == "running")
        state = {"finished": ("✔", "green"), "failed": ("✘", "red")}.get(s.status, ("", ""))
        label = f"{s.done}/{total} {s.unit}" if total else ("done" if finished else "working…")
        t.add_row(Text(s.name, style="bold"), bar, Text(f"{label} {state[0]}", style=state[1]))
        info = [x for x in (_rate(s), f"ETA {fmt_time(s.eta_s)}" if s.eta_s is not None and s.status == "running"
                            else "", f"failures {s.failures}") if x]
        t.add_row("", Text(" · ".join(info), style="red" if s.failures else "dim"), "")
        self.update(t)


class ShardBars(Static):
    """One bar per shard: finished shards full, the shard being written partly (from done counts)."""

    def show(self, s: StageView | None, width: int = 30) -> None:
        if s is not None and s.unit == "steps" and not s.shards:  # training: steps, not shards
            self.update(train_info(s))
            return
        if s is None or (not s.shards and not s.shard_size):
            self.update(Text("" if s is not None and s.status != "running" else "no shards yet", style="dim"))
            return
        size = s.shard_size
        total_shards = s.shards_total
        if total_shards is None and size and s.total:
            total_shards = -(-s.total // size)
        written = sum(s.shards.values())
        in_flight = max(0, s.done - written)
        shown = sorted(s.shards)
        nxt = next((i for i in range(total_shards or (max(shown, default=-1) + 2)) if i not in s.shards), None)
        if nxt is not None and s.status == "running":
            shown.append(nxt)
        hidden = max(0, len(shown) - MAX_SHARD_ROWS)
        t = Table.grid(padding=(0, 1))
        t.add_column(width=10)
        t.add_column(width=width)
        t.add_column()
        for i in shown[hidden:]:
            if i in s.shards:
                n = s.shards[i]
                t.add_row(f"shard {i}", RichBar(total=max(n, 1), completed=max(n, 1), width=width),
                          Text(f"{n} ✓", style="green"))
            else:
                cap = size or max(in_flight, 1)
                if s.total and size:  # the last shard may be short
                    cap = min(size, max(1, s.total - written))
                t.add_row(f"shard {i}", RichBar(total=cap, completed=min(in_flight, cap), width=width),
                          Text(f"{min(in_flight, cap)}/{cap}"))
        head = Text(f"Shards {len(s.shards)}/{total_shards if total_shards else '?'} written"
                    + (f" (first {hidden} not shown)" if hidden else ""), style="bold")
        self.update(Group(head, t))


def train_info(s: StageView) -> Text:
    out = Text("Training\n", style="bold")
    out.append(f"step {s.done}" + (f" of {s.total}" if s.total else "") + "\n")
    for key, label, fmt in (("epoch", "epoch", "{}"), ("loss", "loss", "{:.4g}"), ("lr", "learning rate", "{:.3g}"),
                            ("tokens_per_s", "tokens/s", "{:,.0f}")):
        v = s.extra.get(key)
        if isinstance(v, (int, float)):
            out.append(f"{label} {fmt.format(v)}\n")
    out.append("last checkpoint " + (s.last_checkpoint or "none yet") + "\n",
               style="green" if s.last_checkpoint else "dim")
    return out


def stage_list(stages: dict[str, StageView], steps: list[str]) -> Text:
    """`regen ✔ · cache ▶ · train …` for a multi-step job."""
    out = Text()
    for i, step in enumerate(steps):
        s = stages.get(step)
        mark, style = ("…", "dim") if s is None else {
            "finished": ("✔", "green"), "failed": ("✘", "red")}.get(s.status, ("▶", "bold cyan"))
        if i:
            out.append(" · ", style="dim")
        out.append(f"{step} {mark}", style=style)
    return out


PIPELINE_KEYS = [("tau", "accept length τ (real decoding)"),
                 ("tau_interval", "τ, 95% interval over prompts"), ("prompt_set", "τ measured on"),
                 ("tau_sim", "τ_sim (training, validation)"),
                 ("tau_sim_train", "τ_sim on its own batches"), ("best_heldout_tau", "checkpoint's held-out τ"),
                 ("measured_speedup", "speedup measured here"),
                 ("measured_speedup_interval", "speedup measured here, 95% interval over prompts"),
                 ("implied_speedup", "implied speedup"),
                 ("engine_tau", "vLLM τ (same prompts)"), ("engine_speedup", "vLLM speedup measured"),
                 ("engine_speedup_interval", "vLLM speedup, 95% interval over prompts"),
                 ("lossless", "lossless"), ("export", "export"),
                 ("sglang_command", "SGLang"), ("vllm_command", "vLLM"), ("seconds", "seconds")]


def _pipeline_value(key: str, v: Any) -> Any:
    if key == "prompt_set":  # {count, held_out, trained_on, ...} -> "12 prompts, 12 held out"
        from core.evaluate.report import prompt_set_label

        return f"{v.get('count')} prompts, {prompt_set_label(v)}"
    return v


def summary_text(summary: dict[str, Any], pipeline: bool = False) -> Text:
    """A stage's final summary; `eagle run`'s own is shown as the headline numbers and commands."""
    out = Text()
    items = [(label, _pipeline_value(k, summary[k])) for k, label in PIPELINE_KEYS
             if summary.get(k) is not None] if pipeline else list(summary.items())
    for k, v in items:
        out.append(f"{k}: ", style="bold")
        style = "green" if k == "lossless" and v is True else "bold red" if k == "lossless" else ""
        out.append(fmt_value(v) + "\n", style=style)
    return out
