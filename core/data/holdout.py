"""Held-out conversations reserved before anything trains: `reserve_heldout(spec, count, path)`.

The first `count` valid conversations with distinct prompts of the dataset (after the split slice and the shuffle) are
written to one JSONL file (`messages`, `source_index`, `prompt_sha256`), atomically. Every stage of
a pipeline then reads the dataset with `DataSpec.exclude` = that file, so those prompts, and any
duplicate of them, never reach regeneration, the vocabulary, the cache or training; evaluation and
checkpoint selection read the file itself. Deterministic: the same spec gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from core.data.identity import prompt_sha256
from core.data.types import DataSpec
from core.errors import InputDataError
from core.events import EventSink, Log, NullSink

HELDOUT_FILE = "heldout.jsonl"


@dataclass
class HeldOut:
    path: Path
    count: int
    source_indices: list[int]


def reserve_heldout(spec: DataSpec, count: int, path: str | Path, events: EventSink | None = None) -> HeldOut:
    from core.data import load_conversations
    from core.manifest import write_bytes_atomic

    events = events or NullSink()
    path = Path(path)
    want = count
    while True:  # the first `count` distinct prompts: a duplicate would be the same evaluation twice
        loaded, _ = load_conversations(replace(spec, limit=want, exclude=None), events)
        convs, seen = [], set()
        for c in loaded:
            h = prompt_sha256(c.messages)
            if h not in seen:
                seen.add(h)
                convs.append(c)
        if len(convs) >= count or len(loaded) < want:
            break
        want *= 2
    convs = convs[:count]
    if len(convs) < count:
        raise InputDataError(f"only {len(convs)} usable conversations, too few to hold {count} out "
                             "for evaluation and still train", path=spec.source)
    text = "".join(json.dumps({"messages": c.messages, "source_index": c.index,
                               "prompt_sha256": prompt_sha256(c.messages)}, ensure_ascii=False) + "\n"
                   for c in convs)
    if not path.is_file() or path.read_text() != text:
        write_bytes_atomic(path, text.encode())
    events(Log(stage="data", message=f"held out {count} conversations for evaluation "
                                     f"(rows {', '.join(str(c.index) for c in convs[:8])}"
                                     f"{', ...' if count > 8 else ''}) -> {path}"))
    return HeldOut(path=path, count=count, source_indices=[c.index for c in convs])
