"""Which prompt a conversation asks: the identity that keeps evaluation prompts out of training.

A conversation's prompt is its turns up to (and including) the last user turn. Its identity is the
sha256 of that prompt's non-assistant turns (role and content): regeneration rewrites assistant
turns, so a prompt stays recognisable in a regenerated dataset, and two rows that ask the same
thing (ShareGPT has duplicates) share one identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.errors import InputDataError


def prompt_messages(messages: list[dict]) -> list[dict] | None:
    """The conversation up to (and including) its last user turn; None without a user turn."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    return None if last is None else messages[: last + 1]


def prompt_sha256(messages: list[dict]) -> str:
    prompt = prompt_messages(messages) or messages
    turns = [[m.get("role"), m.get("content")] for m in prompt if m.get("role") != "assistant"]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def read_prompt_hashes(path: str | Path) -> set[str]:
    """The prompt identities listed in a JSONL file: each line's `prompt_sha256`, or the hash of
    its `messages` (so any chat JSONL, e.g. a held-out set, works as an exclusion list)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputDataError("no such prompt list (a JSONL file of held-out conversations)", path=str(p))
    out: set[str] = set()
    for n, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            h = row.get("prompt_sha256") or prompt_sha256(row["messages"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputDataError(f"line {n + 1}: expected prompt_sha256 or messages ({e})", path=str(p)) from None
        out.add(str(h))
    return out


# Records of which conversations a cache holds and a draft trained on: {"index", "prompt_sha256"}
# per line (index = row in the stage's input). Written next to the data they describe.
CACHE_PROMPTS = "conversations.jsonl"
TRAINED_ON = "trained_on.jsonl"


def write_prompt_list(path: str | Path, rows: list[tuple[int, str]]) -> None:
    from core.manifest import write_bytes_atomic

    text = "".join(json.dumps({"index": int(i), "prompt_sha256": h}) + "\n" for i, h in rows)
    write_bytes_atomic(path, text.encode())


def read_prompt_list(path: str | Path) -> list[dict]:
    p = Path(path)
    try:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise InputDataError(f"unreadable prompt record ({e})", path=str(p)) from None
