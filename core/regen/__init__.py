"""Regenerate a chat dataset's answers with the target model through OpenAI-compatible servers.

Public entry: `regenerate(RegenConfig(...), events) -> RegenResult`. See runner.py for the flow,
client.py for the retry/failover policy, journal.py for resume, writer.py for the output format.
"""

from core.regen.client import AllServersDeadError
from core.regen.config import RegenConfig
from core.regen.runner import RegenResult, regenerate

__all__ = ["AllServersDeadError", "RegenConfig", "RegenResult", "regenerate"]
