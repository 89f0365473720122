"""Human rendering of core events on a terminal (rich progress bars and summaries)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core import events as ev


# Training logs about 20 lines of these per run, like a Trainer's logging_steps; every metric of every
# step is in the run's metrics.jsonl (and `--events jsonl`).
TRAIN_LOG_KEYS = ("loss", "acc_0", "tau_sim", "lr", "grad_norm", "tokens_per_s", "epoch")


def fmt_value(v: object) -> str:
    """A metric or summary value for people: floats to 4 significant digits, in lists too."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return str(v)


class ConsoleSink:
    def __init__(self) -> None:
        self.interactive = sys.stdout.isatty()
        # a log file or CI reads this: never break a path or a command onto a second line
        self.console = Console(stderr=False) if self.interactive else Console(stderr=False, width=100_000,
                                                                              soft_wrap=True)
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int | None] = {}  # stage -> total work, to thin out per-step lines

    def _bar(self, stage: str, total: int | None, unit: str):
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeRemainingColumn(), console=self.console,
                                     disable=not self.interactive)
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{stage} ({unit})", total=total, info="")
        return self.tasks[stage]

    def _log_step(self, stage: str, step: int) -> bool:
        total = self.totals.get(stage)
        every = max(1, total // 20) if total else 1
        return step == 1 or step % every == 0 or step == total

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress, self.tasks = None, {}

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, ev.StageStarted):
            self.console.print(f"[bold cyan]▶ {e.stage}[/] started"
                               + (f" ({e.total} {e.unit})" if e.total is not None else ""))
            self.totals[e.stage] = e.total
            self._bar(e.stage, e.total, e.unit)
        elif isinstance(e, ev.Progress):
            t = self._bar(e.stage, e.total, e.unit)
            info = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in e.extra.items())
            self.progress.update(t, completed=e.done, total=e.total, info=info)
            if not self.interactive and e.total and (e.done == e.total or e.done % max(1, e.total // 10) == 0):
                self.console.print(f"  {e.stage}: {e.done}/{e.total} {e.unit} {info}")
        elif isinstance(e, ev.ShardDone):
            self.console.print(f"  shard {e.shard} done: {e.samples} samples → {e.path}")
        elif isinstance(e, ev.SampleFailed):
            self.console.print(f"  [yellow]sample {e.index} failed:[/] {e.reason}")
        elif isinstance(e, ev.StepMetrics):
            if e.split == "train" and not self._log_step(e.stage, e.step):
                return
            keys = [k for k in TRAIN_LOG_KEYS if k in e.metrics] if e.split == "train" else list(e.metrics)
            m = " ".join(f"{k}={fmt_value(e.metrics[k])}" for k in keys)
            self.console.print(f"  \\[{e.split}] step {e.step}: {m}")
        elif isinstance(e, ev.CheckpointSaved):
            self.console.print(f"  checkpoint step {e.step} → {e.path}")
        elif isinstance(e, ev.Log):
            style = {"warning": "yellow", "error": "red"}.get(e.level, "")
            self.console.print(f"[{style}]{e.message}[/]" if style else e.message)
        elif isinstance(e, ev.StageFinished):
            self._stop()
            self.console.print(f"[bold green]✔ {e.stage}[/] finished")
            for k, v in e.summary.items():
                self.console.print(f"  {k}: {fmt_value(v)}")
        elif isinstance(e, ev.StageFailed):
            self._stop()
            self.console.print(f"[bold red]✘ {e.stage}[/] failed: {e.message}")
