"""Regenerate a chat dataset's answers with the target model through OpenAI-compatible servers.

Public entry: `regenerate(RegenConfig(...), events) -> RegenResult`. See entry.py and runner.py
for the flow, client.py for the retry/failover policy, turns.py for which turns are regenerated,
journal.py for resume, writer.py for the output format.

`import core.regen.config` stays light (no pyarrow): the run config, the CLI and the TUI read their
settings from it, so the heavy names below load on first use.
"""

from typing import Any

from core.regen.config import RegenConfig

__all__ = ["AllServersDeadError", "RegenConfig", "RegenResult", "regenerate"]

_LAZY = {"AllServersDeadError": "core.regen.client", "regenerate": "core.regen.entry",
         "RegenResult": "core.regen.runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
