"""Turn a raw row's conversation into our messages format: [{"role", "content"}].

Two shapes are accepted per turn: `{"role", "content"}` (OpenAI / HF chat) and ShareGPT's
`{"from", "value"}`. ShareGPT speaker names are mapped to roles; the ShareGPT dump we embed also
contains "chatgpt", "bing" and "bard" turns, which are assistant answers. Unknown role names are
kept as they are so validation can report them by name.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
}

# Columns tried, in order, when no messages column is named.
AUTO_COLUMNS = ("messages", "conversations")


class RowProblem(Exception):
    """A row that cannot be used: `reason` is the short category counted in reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def map_role(name: Any) -> Any:
    if isinstance(name, str):
        return ROLE_ALIASES.get(name.strip().lower(), name)
    return name


def to_messages(value: Any) -> list[dict]:
    """Normalize one conversation value (list of turns) to messages; RowProblem if malformed."""
    if value is None:
        raise RowProblem("empty conversation", "the conversation is missing (null)")
    if hasattr(value, "tolist"):  # numpy arrays from some arrow conversions
        value = value.tolist()
    if isinstance(value, str):
        raise RowProblem("malformed turn", "the conversation is a string, not a list of turns")
    if not isinstance(value, (list, tuple)):
        raise RowProblem("malformed turn", f"the conversation is a {type(value).__name__}, "
                                           "not a list of turns")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowProblem("malformed turn", f"turn {i} is a {type(turn).__name__}, not an object")
        # Arrow-backed sources unify mixed schemas, so absent keys may appear as None.
        if turn.get("role") is not None:
            role, content = turn["role"], turn.get("content")
        elif turn.get("from") is not None:
            role, content = turn["from"], turn.get("value")
        elif "role" in turn or "from" in turn:
            role, content = None, turn.get("content", turn.get("value"))
        else:
            keys = ", ".join(sorted(map(str, turn))) or "none"
            raise RowProblem("malformed turn", f"turn {i} has neither role/content nor "
                                               f"from/value keys (keys: {keys})")
        messages.append({"role": map_role(role), "content": content})
    return messages

