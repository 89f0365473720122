"""Live training curves: one sparkline per metric (loss, accuracy per TTT step, τ_sim, and the real
held-out τ measured at each checkpoint), latest value beside it."""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline, Static

MAX_POINTS = 200  # keep the newest points: a sparkline is as wide as the panel anyway
MAX_ROWS = 14
_ACC = re.compile(r"^acc(?:uracy)?[_@-]?(?:step[_-]?)?(\d+)$")


def plotted(name: str, split: str) -> bool:
    """The curves that matter: loss, accuracy per TTT step and τ_sim (val: loss and τ_sim), and
    the real τ of real speculative decoding on held-out prompts (split "heldout")."""
    if split == "heldout":
        return name == "tau"
    if name in ("loss", "tau_sim"):
        return True
    return split == "train" and _ACC.match(name) is not None


def metric_order(name: str) -> tuple:
    """loss first, then acc per TTT step in order, then τ, then the rest alphabetically."""
    m = _ACC.match(name)
    if "loss" in name:
        return (0, name == "loss" and -1 or 0, name)
    if m:
        return (1, int(m.group(1)), name)
    if name.startswith("tau") or "accept" in name:
        return (2, 0, name)
    return (3, 0, name)


def metric_label(name: str, split: str) -> str:
    if split == "heldout" and name == "tau":
        return "held-out τ"
    m = _ACC.match(name)
    label = f"acc TTT{m.group(1)}" if m else name.replace("tau_sim", "τ_sim").replace("tau", "τ")
    return label if split == "train" else f"{split} {label}"


class CurveRow(Horizontal):
    DEFAULT_CSS = """
    CurveRow { height: 1; }
    CurveRow > .curve-label { width: 14; }
    CurveRow > Sparkline { width: 1fr; }
    CurveRow > .curve-value { width: 12; text-align: right; }
    """

    def __init__(self, key: str, label: str) -> None:
        super().__init__(classes="curve")
        self.key, self.label = key, label
        self.points: list[tuple[int, float]] = []

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="curve-label")
        yield Sparkline([], classes="curve-line")
        yield Label("", classes="curve-value")

    def on_mount(self) -> None:
        self._draw()

    def show(self, points: list[tuple[int, float]]) -> None:
        # a job update can arrive between this row's mount and its children's: keep the points and
        # draw them once the sparkline exists
        self.points = points
        self._draw()

    def _draw(self) -> None:
        lines = self.query(Sparkline)
        if not self.points or not lines:
            return
        lines.first().data = [v for _, v in self.points[-MAX_POINTS:]]
        step, last = self.points[-1]
        self.query_one(".curve-value", Label).update(f"{last:.4g} @{step}")


class Curves(Vertical):
    """Rows appear as metrics first arrive; `show(metrics)` takes StageView.metrics."""

    DEFAULT_CSS = """
    Curves { height: auto; }
    """

    def compose(self) -> ComposeResult:
        yield Static("no training metrics yet", classes="curves-empty")

    def reset(self) -> None:
        self.remove_children()
        self.mount(Static("no training metrics yet", classes="curves-empty"))

    latest: dict = {}

    def show(self, metrics: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
        self.latest = metrics
        wanted = []
        for split in sorted(metrics, key=lambda s: (s != "train", s)):
            for name in sorted(metrics[split], key=metric_order):
                if metrics[split][name] and plotted(name, split):
                    wanted.append((f"{split}:{name}", metric_label(name, split), metrics[split][name]))
        wanted = wanted[:MAX_ROWS]
        rows = {r.key: r for r in self.query(CurveRow)}
        if any(key not in rows for key, _, _ in wanted):
            # remount all rows so they stay in order (val metrics may arrive before train ones)
            self.remove_children()
            self.mount_all([CurveRow(key, label) for key, label, _ in wanted])
            # refresh once the new rows are mounted, with whatever is newest by then
            self.call_after_refresh(lambda: self.show(self.latest))
            return
        for key, _, points in wanted:
            rows[key].show(points)
