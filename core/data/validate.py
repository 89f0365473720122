"""Per-row checks on normalized messages. Each problem has a short reason (counted in reports)
and a detail naming the turn and the value at fault."""

from __future__ import annotations

from core.data.normalize import ROLE_ALIASES, ROLES, RowProblem

DEFAULT_MAX_CHARS = 200_000  # a whole conversation longer than this is treated as absurd

REASONS = ("malformed JSON", "malformed row", "missing messages", "malformed turn", "empty conversation",
           "unknown role", "non-string content", "starts with assistant", "no assistant turn",
           "too long")


def check_messages(messages: list[dict], max_chars: int = DEFAULT_MAX_CHARS) -> None:
    """Raise RowProblem for the first problem found in a normalized conversation."""
    if not messages:
        raise RowProblem("empty conversation", "the conversation has no turns")
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ROLES:
            known = ", ".join(ROLES)
            aliases = ", ".join(sorted(set(ROLE_ALIASES) - set(ROLES)))
            raise RowProblem("unknown role", f"unknown role {role!r} in turn {i} "
                                             f"(expected {known}; ShareGPT {aliases})")
        if not isinstance(m["content"], str):
            raise RowProblem("non-string content", f"turn {i} ({role}) has "
                                                   f"{type(m['content']).__name__} content, not a string")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first == "assistant":
        raise RowProblem("starts with assistant", "the conversation starts with an assistant turn "
                                                  "(after any system turn)")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn", "the conversation has no assistant turn")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise RowProblem("too long", f"the conversation has {total:,} characters "
                                     f"(limit {max_chars:,}; raise max_chars to keep it)")
