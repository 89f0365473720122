"""`eagle-tui [CONFIG.yaml]`: the Textual wizard over the one RunConfig that `eagle run` reads.

The App owns what must outlive a screen: the config being edited, the jobs (subprocesses) and the
machine readings. Everything is injectable (`system`, `command`, `probe`) so tests can run fast
fake commands and fixed disk / GPU readings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rich.text import Text
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.widgets import Static

from core.errors import EagleError
from core.runconfig import RunConfig
from eagle_tui.jobs import JobChanged, JobEnded, JobManager, measure_speed
from eagle_tui.screens.dashboard import DashboardScreen
from eagle_tui.screens.dialogs import ConfirmScreen
from eagle_tui.screens.help import HelpScreen
from eagle_tui.screens.pick_path import PathPicker
from eagle_tui.screens.wizard import WizardScreen
from eagle_tui.sysinfo import SystemInfo, probe_gpus
from eagle_tui.widgets.panes.base import config_problem

DEFAULT_CONFIG_NAME = "eagle-run.yaml"


class EagleApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "eagle-tui"
    SUB_TITLE = "EAGLE-3 draft: dataset → regenerate → cache/online → train → serve"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]
    ENABLE_COMMAND_PALETTE = False  # every action has a key (see `?`); ctrl+p stays free

    def __init__(self, config: RunConfig | None = None, config_path: str | Path | None = None,
                 system: SystemInfo | None = None, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, probe: bool = True,
                 cursor_blink: bool = True) -> None:
        super().__init__()
        self.config = config or RunConfig()
        self.config_path = Path(config_path) if config_path else None
        if self.config_path is not None:
            self.config._base_dir = str(self.config_path.resolve().parent)
        self.system = system or SystemInfo(probed=not probe)
        self.jobs = JobManager(self, command=command, env=env)
        self.cursor_blink = cursor_blink
        self.dirty = False
        self.known_rows: dict[str, int] = {}  # dataset source -> rows, learned by Preview
        self.speeds: dict[str, float] = {}  # target -> measured tokens/s (ctrl+t)
        self._probe = probe and system is None

    # ---- start-up ------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.push_screen(WizardScreen())
        if self._probe:
            self._probe_gpus()

    @work(thread=True, exclusive=True, group="probe", exit_on_error=False)
    def _probe_gpus(self) -> None:
        gpus = probe_gpus()
        self.call_from_thread(self._probed, gpus)

    def _probed(self, gpus) -> None:
        self.system.gpus, self.system.probed = gpus, True
        if isinstance(self.wizard, WizardScreen):
            self.wizard.refresh_state()

    @property
    def wizard(self) -> WizardScreen | None:
        for s in self.screen_stack:
            if isinstance(s, WizardScreen):
                return s
        return None

    # ---- config files --------------------------------------------------------------------------
    async def ensure_saved(self) -> Path | None:
        """Save to the current path, asking for one the first time; None if the user cancels."""
        if self.config_path is None:
            chosen = await self.push_screen_wait(PathPicker("Save the pipeline config as", DEFAULT_CONFIG_NAME))
            if not chosen:
                return None
            self.config_path = Path(chosen).expanduser()
        return self.save_config(self.config_path)

    def save_config(self, path: Path) -> Path | None:
        _, problem = config_problem(self.config)
        if problem:
            self.notify(problem, title="Not saved", severity="error")
            return None
        try:
            self.config.save(path)
        except (OSError, EagleError) as e:
            self.notify(f"{path}: {e}", title="Not saved", severity="error")
            return None
        self.config._base_dir = str(path.resolve().parent)  # relative workdir follows the file
        self.config_path, self.dirty = path, False
        self.notify(f"Saved {path}: `eagle run {path}` runs the same pipeline", title="Saved")
        if self.wizard is not None:
            self.wizard.refresh_state()
        return path

    @work(exclusive=True, group="files", exit_on_error=False)
    async def action_save(self) -> None:
        if self.config_path is None:
            await self.ensure_saved()
        else:
            self.save_config(self.config_path)

    @work(exclusive=True, group="files", exit_on_error=False)
    async def action_open(self) -> None:
        chosen = await self.push_screen_wait(PathPicker("Open a pipeline config (YAML)",
                                                        str(self.config_path or ""), must_exist=True))
        if chosen:
            self.open_config(Path(chosen).expanduser())

    def open_config(self, path: Path) -> bool:
        try:
            cfg = RunConfig.load(path)
        except EagleError as e:
            self.notify(str(e), title="Cannot open", severity="error")
            return False
        self.config, self.config_path, self.dirty = cfg, path, False
        if self.wizard is not None:
            self.wizard.load_config()
        self.notify(f"Opened {path}")
        return True

    # ---- jobs ----------------------------------------------------------------------------------
    def start_job(self, config_path: Path, steps: list[str], resume: bool):
        job = self.jobs.start(config_path, steps, resume)
        self.action_dashboard(job.id)
        return job

    def action_dashboard(self, job_id: int | None = None) -> None:
        if isinstance(self.screen, DashboardScreen):
            if job_id is not None:
                self.screen.job_id = job_id
                self.screen.redraw(full=True)
            return
        self.push_screen(DashboardScreen(job_id))

    def on_job_changed(self, message: JobChanged) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, DashboardScreen):
                screen.job_changed(message.job_id)
        self.refresh_status()

    def on_job_ended(self, message: JobEnded) -> None:
        job = self.jobs.jobs[message.job_id]
        severity = {"finished": "information", "cancelled": "warning"}.get(job.status, "error")
        self.notify(f"{job.title}: {job.status}" + (f" ({job.error})" if job.error and job.status == "failed"
                                                    else ""), severity=severity)
        self.refresh_status()

    def refresh_status(self) -> None:
        wizard = self.wizard
        if wizard is None or not wizard.is_mounted:
            return
        text = Text()
        text.append("config: ", style="dim")
        text.append(str(self.config_path) if self.config_path else "not saved yet (ctrl+s)")
        if self.dirty and self.config_path:
            text.append(" (modified)", style="yellow")
        job = self.jobs.latest()
        if job is not None:
            text.append("   ")
            stage = job.stages.get(job.current) if job.current else None
            progress = f" {stage.name} {stage.done}/{stage.total}" if stage and stage.total else ""
            text.append(f"{job.title}: {job.status}{progress} (ctrl+l)",
                        style="bold cyan" if job.active else "")
        wizard.query_one("#status", Static).update(text)

    @work(exclusive=True, group="measure", exit_on_error=False)
    async def action_measure(self) -> None:
        cfg = self.config
        target = cfg.target.model
        self.notify(f"Measuring {target}'s speed in a subprocess (loads the model once)…")
        try:
            tps = await measure_speed(target, cfg.target.device, min(cfg.train.max_tokens_per_batch, 2048),
                                      min(cfg.features.max_length, 512))
        except (RuntimeError, ValueError, OSError) as e:
            self.notify(f"Could not measure {target}: {e}", severity="error")
            return
        self.speeds[target] = tps
        self.notify(f"{target}: {tps:,.0f} tokens/s forward")
        if self.wizard is not None:
            self.wizard.refresh_state()

    # ---- help and quit -------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    @work(exclusive=True, group="quit", exit_on_error=False)
    async def action_quit(self) -> None:
        active = self.jobs.active()
        if active:
            names = ", ".join(j.title for j in active)
            if not await self.push_screen_wait(ConfirmScreen(
                    f"{names} still running. Quit and stop it? (It can be resumed later.)",
                    yes="Stop and quit", danger=True)):
                return
            await self.jobs.shutdown()
        self.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eagle-tui", description="The eagle-tui wizard: build, run "
                                     "and resume an EAGLE-3 pipeline config (the YAML `eagle run` reads).")
    parser.add_argument("config", nargs="?", help=f"YAML config to open or create (default: new, saved as "
                        f"{DEFAULT_CONFIG_NAME} on first save)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.version:
        from core import __version__

        print(f"eagle-tui {__version__}")
        return 0
    config = None
    if args.config and Path(args.config).exists():
        try:
            config = RunConfig.load(args.config)
        except EagleError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    EagleApp(config=config, config_path=args.config).run()
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
