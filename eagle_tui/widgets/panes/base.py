"""A wizard pane: a scrollable form over some sections of the one `RunConfig` the App edits."""

from __future__ import annotations

import re
from typing import Any

from textual.containers import VerticalScroll

from core.errors import UsageError
from eagle_tui.widgets.form import FieldChanged, FieldRow

_FIELD_RE = re.compile(r"config field ([\w]+)\.?")


def config_problem(cfg: Any) -> tuple[str | None, str | None]:
    """(section, message) of the first problem `RunConfig.validate` finds, or (None, None)."""
    try:
        cfg.validate()
    except UsageError as e:
        m = _FIELD_RE.search(str(e))
        return (m.group(1) if m else None), str(e)
    return None, None


class Pane(VerticalScroll):
    """Subclasses set TITLE, SECTIONS (config sections they own) and STEPS (what Run starts here)."""

    TITLE = ""
    SHORT = ""  # for the step bar, where the full title does not fit
    SECTIONS: tuple[str, ...] = ()
    STEPS: tuple[str, ...] = ()

    def rows(self) -> list[FieldRow]:
        return list(self.query(FieldRow))

    def load(self, cfg: Any) -> None:
        for row in self.rows():
            row.load(cfg)
        self.sync(cfg)

    def sync(self, cfg: Any) -> None:
        """Enable/disable rows that depend on other choices (skip switches, modes)."""

    def on_field_changed(self, event: FieldChanged) -> None:
        self.sync(self.app.config)  # then it bubbles on to the wizard screen

    def problems(self, cfg: Any) -> list[str]:
        """Why Next is disabled here: invalid inputs first, then the config's own checks."""
        out = [f"{row.label}: {row.error}" for row in self.rows() if row.error and not row.disabled]
        section, message = config_problem(cfg)
        if section in self.SECTIONS and message:
            out.append(message.replace("config field ", ""))
        out.extend(self.extra_problems(cfg))
        return out

    def extra_problems(self, cfg: Any) -> list[str]:
        return []

    def run_steps(self, cfg: Any) -> list[str]:
        """The steps Run (ctrl+r) starts from this pane, given the current choices."""
        enabled = cfg.enabled_steps()
        return [s for s in self.STEPS if s in enabled]

    def why_no_run(self, cfg: Any) -> str:
        return f"nothing to run on the {self.TITLE} pane with these choices"
