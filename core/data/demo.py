"""The demo's dataset file: short conversations of the embedded ShareGPT sample (core.assets)."""

from __future__ import annotations

import json
from pathlib import Path

from core.events import EventSink


def write_demo_subset(out: Path, count: int, max_chars: int = 1200, events: EventSink | None = None) -> Path:
    """The first `count` valid demo conversations whose whole text fits `max_chars`, as JSONL.

    ShareGPT conversations run to thousands of tokens; on a 2-core CPU the prefill of such prompts
    dominates regeneration and evaluation, so the demo picks short ones (written atomically).
    """
    from core.data import DataSpec, load_conversations
    from core.manifest import write_bytes_atomic

    convs, _ = load_conversations(DataSpec(source="demo"), events)
    picked = [c for c in convs if sum(len(m["content"]) for m in c.messages) <= max_chars][:count]
    if len(picked) < count:
        from core.errors import UsageError

        raise UsageError(f"only {len(picked)} demo conversations fit {max_chars} characters (asked for {count})")
    lines = [json.dumps({"id": f"sharegpt-{c.index}", "messages": c.messages}) for c in picked]
    write_bytes_atomic(out, ("\n".join(lines) + "\n").encode())
    return Path(out)
