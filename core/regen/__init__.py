"""Regenerate a chat dataset's answers with the target model through OpenAI-compatible servers.

Public entry: `regenerate(RegenConfig(...), events) -> RegenResult`. See entry.py and runner.py
for the flow, client.py for the retry/failover policy, turns.py for which turns are regenerated,
journal.py for resume, writer.py for the output format.
"""

from core.regen.client import AllServersDeadError
from core.regen.config import RegenConfig
from core.regen.entry import regenerate
from core.regen.runner import RegenResult

__all__ = ["AllServersDeadError", "RegenConfig", "RegenResult", "regenerate"]
