"""The wizard: five panes in a ContentSwitcher over one RunConfig, the budget panel beside them.

Back / Next keep every value (the panes stay mounted; they only edit `app.config`). Next is disabled
while the pane has a problem, and the reason is shown beside it. Run (ctrl+r) saves the YAML, asks
about earlier work, warns when the budget does not fit, then starts `eagle run CONFIG --steps ...`.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, Header, Static

from core.runconfig import RESUMED_STEPS
from eagle_tui.screens.dialogs import (BudgetWarningScreen, ResumeScreen, delete_work,
                                       find_existing_work)
from eagle_tui.widgets.budget_panel import BudgetPanel
from eagle_tui.widgets.form import FieldChanged
from eagle_tui.widgets.panes.base import Pane, config_problem
from eagle_tui.widgets.panes.dataset import DatasetPane
from eagle_tui.widgets.panes.features import FeaturesPane
from eagle_tui.widgets.panes.regen import RegenPane
from eagle_tui.widgets.panes.serve import ServePane
from eagle_tui.widgets.panes.train import TrainPane

PANES: list[tuple[str, type[Pane]]] = [("dataset", DatasetPane), ("regen", RegenPane),
                                       ("features", FeaturesPane), ("train", TrainPane),
                                       ("serve", ServePane)]
DIR_STEPS = tuple(RESUMED_STEPS)  # steps whose output is a folder with a manifest


class WizardScreen(Screen):
    BINDINGS = [
        Binding("ctrl+n", "next", "Next"),
        Binding("ctrl+b", "back", "Back"),
        Binding("ctrl+r", "run_step", "Run step"),
        Binding("ctrl+g", "run_all", "Run all"),
        Binding("ctrl+s", "app.save", "Save"),
        Binding("ctrl+o", "app.open", "Open"),
        Binding("ctrl+l", "app.dashboard", "Dashboard"),
        Binding("ctrl+t", "app.measure", "Measure"),
        Binding("question_mark,f1", "app.help", "Help"),
    ]

    def __init__(self) -> None:
        super().__init__(id="wizard")
        self.index = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Static(id="steps")
                with ContentSwitcher(initial="pane-dataset", id="panes"):
                    for key, cls in PANES:
                        yield cls(id=f"pane-{key}")
                with Horizontal(id="nav"):
                    yield Button("◀ Back", id="back", compact=True)
                    yield Static(id="next-reason")
                    yield Button("Run step", id="run", compact=True, variant="success")
                    yield Button("Next ▶", id="next", compact=True, variant="primary")
            yield BudgetPanel(id="budget")
        yield Static(id="status")
        yield Footer()

    # ---- state -------------------------------------------------------------------------------
    @property
    def panes(self) -> list[Pane]:
        return [self.query_one(f"#pane-{k}", Pane) for k, _ in PANES]

    @property
    def pane(self) -> Pane:
        return self.panes[self.index]

    def on_mount(self) -> None:
        self.load_config()

    def load_config(self) -> None:
        """Show `app.config` in every pane (start-up and after ctrl+o)."""
        for p in self.panes:
            p.load(self.app.config)
        self.refresh_state()

    def refresh_state(self) -> None:
        cfg = self.app.config
        problems = self.pane.problems(cfg)
        last = self.index == len(PANES) - 1
        nxt = self.query_one("#next", Button)
        nxt.disabled = bool(problems) or last
        reason = self.query_one("#next-reason", Static)
        if problems:
            reason.update(Text("✗ " + problems[0], style="bold red"))
        elif last:
            reason.update(Text("ctrl+g runs all steps", style="dim"))
        else:
            reason.update("")
        self.query_one("#back", Button).disabled = self.index == 0
        steps = self.pane.run_steps(cfg)
        run = self.query_one("#run", Button)
        run.label = f"Run {'+'.join(steps)}" if steps else "Run step"
        run.disabled = not steps
        self.query_one("#steps", Static).update(self._step_bar())
        self.query_one(BudgetPanel).refresh_budget(cfg, self.app.system)
        self.app.refresh_status()

    def _step_bar(self) -> Text:
        out = Text()
        for i, (key, cls) in enumerate(PANES):
            if i:
                out.append("›", style="dim")
            style = "bold reverse" if i == self.index else ("" if i < self.index else "dim")
            out.append(f" {i + 1} {cls.SHORT or cls.TITLE} ", style=style)
        return out

    @on(FieldChanged)
    def _field_changed(self) -> None:
        self.app.dirty = True
        self.refresh_state()

    # ---- navigation --------------------------------------------------------------------------
    def go(self, index: int) -> None:
        self.index = max(0, min(len(PANES) - 1, index))
        self.query_one(ContentSwitcher).current = f"pane-{PANES[self.index][0]}"
        self.pane.scroll_home(animate=False)
        self.refresh_state()

    def action_next(self) -> None:
        problems = self.pane.problems(self.app.config)
        if problems:
            self.notify(problems[0], title="Fix this first", severity="error")
            return
        if self.index < len(PANES) - 1:
            self.go(self.index + 1)

    def action_back(self) -> None:
        if self.index > 0:
            self.go(self.index - 1)

    @on(Button.Pressed, "#next")
    def _next(self) -> None:
        self.action_next()

    @on(Button.Pressed, "#back")
    def _back(self) -> None:
        self.action_back()

    @on(Button.Pressed, "#run")
    def _run(self) -> None:
        self.action_run_step()

    # ---- running -----------------------------------------------------------------------------
    def action_run_step(self) -> None:
        cfg = self.app.config
        steps = self.pane.run_steps(cfg)
        if not steps:
            self.notify(self.pane.why_no_run(cfg), severity="warning")
            return
        self.launch(steps)

    def action_run_all(self) -> None:
        self.launch(self.app.config.enabled_steps())

    @work(exclusive=True, group="launch", exit_on_error=False)
    async def launch(self, steps: list[str]) -> None:
        """Checks, then start: valid config → budget fits (or user agrees) → saved → resume prompt."""
        app = self.app
        cfg = app.config
        busy = app.jobs.active()
        if busy:  # two runs would write the same output folders
            self.notify(f"{busy[0].title} is still running: wait for it or cancel it (ctrl+l, then c)",
                        title="Cannot run yet", severity="warning")
            return
        for p in self.panes:
            problems = p.problems(cfg)
            if problems:
                self.notify(f"{p.TITLE}: {problems[0]}", title="Cannot run yet", severity="error")
                return
        _, message = config_problem(cfg)
        if message:
            self.notify(message, title="Cannot run yet", severity="error")
            return
        budget = self.query_one(BudgetPanel).refresh_budget(cfg, app.system)
        problems = budget.problems(steps + ["device"])
        if problems and not await app.push_screen_wait(BudgetWarningScreen(steps, problems)):
            return
        path = await app.ensure_saved()
        if path is None:
            return
        works = [w for s in steps if s in DIR_STEPS
                 for w in [find_existing_work(s, cfg.step_output_dir(s))] if w is not None]
        resume = False
        if works:
            choice = await app.push_screen_wait(ResumeScreen(works))
            if choice == "cancel":
                return
            if choice == "restart":
                delete_work(works)
                self.notify("Deleted: " + ", ".join(str(w.path) for w in works))
            resume = choice == "resume"
        app.start_job(path, steps, resume)
