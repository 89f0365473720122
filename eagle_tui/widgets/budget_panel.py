"""The always-visible budget: disk needed vs free, GPU memory vs detected GPUs, time estimates, warnings.

`assess` is pure (estimates + readings -> lines and per-step warnings) so tests can hold the warning
logic to exact numbers; the panel only renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from core.step_budgets import StepBudget
from eagle_tui.sysinfo import GpuInfo, SystemInfo
from eagle_tui.widgets.estimates import fmt_bytes, fmt_time, step_budgets

TIGHT = 0.9  # warn (yellow) above this share of what is free


@dataclass
class Assessment:
    workdir: str
    disk_needed: int | None
    disk_free: int
    gpu_line: str
    steps: list[StepBudget]
    warnings: dict[str, list[str]] = field(default_factory=dict)  # step -> problems (red)
    cautions: list[str] = field(default_factory=list)  # tight but fits (yellow)
    unavailable: str | None = None

    def problems(self, steps: list[str] | None = None) -> list[str]:
        keys = self.warnings if steps is None else [s for s in steps if s in self.warnings]
        return [w for k in keys for w in self.warnings.get(k, [])]


def assess(budgets: list[StepBudget] | str, enabled: list[str], workdir: Path, disk_free: int,
           gpus: list[GpuInfo], ram_free: int, device: str = "auto") -> Assessment:
    if isinstance(budgets, str):
        return Assessment(str(workdir), None, disk_free, _gpu_line(gpus), [], unavailable=budgets)
    steps = [b for b in budgets if b.step in enabled]
    a = Assessment(str(workdir), None, disk_free, _gpu_line(gpus), steps)
    total = 0
    for b in steps:
        total += b.disk_bytes or 0
        if total > disk_free:
            a.warnings.setdefault(b.step, []).append(
                f"{b.step} does not fit on disk: needs {fmt_bytes(total)} in all, {fmt_bytes(disk_free)} free")
    a.disk_needed = total
    if total <= disk_free and total > TIGHT * disk_free:
        a.cautions.append(f"disk is tight: {fmt_bytes(total)} of {fmt_bytes(disk_free)} free")
    if device == "cuda" and not gpus:
        a.warnings.setdefault("device", []).append("device is cuda but no GPU is detected")
    if gpus:
        per_gpu = min(g.total_bytes for g in gpus)
        for b in steps:
            if b.gpu_bytes and b.gpu_bytes > per_gpu:
                a.warnings.setdefault(b.step, []).append(
                    f"{b.step} needs {fmt_bytes(b.gpu_bytes)} of GPU memory, each GPU has {fmt_bytes(per_gpu)}")
    else:
        for b in steps:
            if b.ram_bytes and b.ram_bytes > ram_free:
                a.warnings.setdefault(b.step, []).append(
                    f"{b.step} needs {fmt_bytes(b.ram_bytes)} of RAM on CPU, {fmt_bytes(ram_free)} available")
    return a


def _gpu_line(gpus: list[GpuInfo]) -> str:
    if not gpus:
        return "no GPU detected: runs on CPU"
    names = {g.name for g in gpus}
    name = names.pop() if len(names) == 1 else "mixed GPUs"
    return f"{len(gpus)}× {name}, {fmt_bytes(min(g.total_bytes for g in gpus))} each"


class BudgetPanel(Static):
    """Right-hand panel; `refresh_budget(cfg, system)` recomputes from core.budget and redraws."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.assessment: Assessment | None = None

    def refresh_budget(self, cfg: Any, system: SystemInfo) -> Assessment:
        workdir = cfg.workdir_path()
        enabled = cfg.enabled_steps()
        app = self.app
        budgets = step_budgets(cfg, len(system.gpus), getattr(app, "known_rows", {}).get(cfg.dataset.source),
                               getattr(app, "speeds", {}).get(cfg.target.model))
        a = assess(budgets, enabled, workdir, system.free_bytes(workdir), system.gpus,
                   system.ram_free(), cfg.target.device)
        if not system.probed:
            a.gpu_line = "looking for GPUs…"
        self.assessment = a
        self.set_class(bool(a.warnings), "-warn")
        self.update(render_assessment(a))
        return a


def render_assessment(a: Assessment) -> Group:
    parts: list[Any] = [Text("Budget", style="bold"), Text(f"writes to {a.workdir}", style="dim")]
    disk = Text("Disk  ")
    if a.disk_needed is None:
        disk.append(f"? needed · {fmt_bytes(a.disk_free)} free")
    else:
        ok = a.disk_needed <= a.disk_free
        disk.append(f"{fmt_bytes(a.disk_needed)} needed · {fmt_bytes(a.disk_free)} free ")
        disk.append("✓" if ok else "✗", style="green" if ok else "bold red")
    parts.append(disk)
    parts.append(Text("GPU   " + a.gpu_line, style="bold" if "no GPU" in a.gpu_line else ""))
    if a.unavailable:
        parts.append(Text(a.unavailable, style="italic dim"))
    if a.steps:
        t = Table(box=None, pad_edge=False, show_edge=False, expand=False, padding=(0, 1))
        t.add_column("step")
        t.add_column("disk", justify="right")
        t.add_column("RAM" if "no GPU" in a.gpu_line else "GPU mem", justify="right")
        t.add_column("time", justify="right")
        for b in a.steps:
            mem = b.gpu_bytes if "no GPU" not in a.gpu_line else b.ram_bytes
            style = "red" if b.step in a.warnings else ""
            t.add_row(b.step, fmt_bytes(b.disk_bytes), fmt_bytes(mem), fmt_time(b.time_s), style=style)
        parts.append(t)
        timed = [b for b in a.steps if b.time_s is not None]
        if timed:
            parts.append(Text(f"Time  {fmt_time(sum(b.time_s for b in timed))} for "
                              f"{', '.join(b.step for b in timed)} (measured speed, upper bound)"))
        else:
            parts.append(Text("Time  ? press ctrl+t to measure the target's speed", style="dim"))
        for b in a.steps:
            if b.note and b.step in ("cache", "train"):
                parts.append(Text(f"{b.step}: {b.note}", style="dim"))
    for c in a.cautions:
        parts.append(Text("⚠ " + c, style="yellow"))
    for ws in a.warnings.values():
        for w in ws:
            parts.append(Text("✗ " + w, style="bold red"))
    return Group(*parts)
