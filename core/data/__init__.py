"""Chat data layer: load conversations from files, shard folders, saved datasets or the hub,
normalize them to `messages: [{role, content}]` and validate every row.

`load_conversations(spec, events)` is the one entry point. Bad rows are skipped and recorded
(index, reason) in the LoadReport, or, with `strict`, the first one raises InputDataError naming
the row and the reason.
"""

from __future__ import annotations

import random
import time

from core.data.identity import prompt_messages, prompt_sha256
from core.data.normalize import ROLES, RowProblem, to_messages
from core.data.split import SplitSpec, parse_split
from core.data.types import BadRow, Conversation, DataSpec, LoadReport
from core.data.validate import DEFAULT_MAX_CHARS, REASONS, check_messages
from core.errors import InputDataError
from core.events import EventSink, Log, NullSink, Progress

__all__ = ["DataSpec", "Conversation", "LoadReport", "BadRow", "load_conversations",
           "normalize_row", "prompt_messages", "prompt_sha256", "ROLES", "REASONS", "DEFAULT_MAX_CHARS", "SplitSpec", "parse_split"]

_BATCH = 1024


def normalize_row(value, max_chars: int = DEFAULT_MAX_CHARS) -> list[dict]:
    """Messages of one raw conversation value, validated; RowProblem when it is a bad row."""
    if isinstance(value, RowProblem):
        raise value
    messages = to_messages(value)
    check_messages(messages, max_chars)
    return messages


def load_conversations(spec: DataSpec, events: EventSink | None = None) -> tuple[list[Conversation], LoadReport]:
    from core.data.loaders import open_source, pick_source_column

    events = events or NullSink()
    split = parse_split(spec.split)
    t0 = time.monotonic()
    src = open_source(spec.source, split.name)
    column = pick_source_column(src, spec.messages_column)
    positions = list(split.positions(src.num_rows))
    if spec.shuffle_seed is not None:
        random.Random(spec.shuffle_seed).shuffle(positions)
    report = LoadReport(source=src.path, format=src.kind, messages_column=column,
                        rows_in_source=src.num_rows)
    events(Log(stage="data", message=f"reading {src.path} ({src.kind}, {src.num_rows} rows, "
                                     f"column {column!r}, {len(positions)} selected)"))
    excluded = set()
    if spec.exclude:
        from core.data.identity import read_prompt_hashes

        excluded = read_prompt_hashes(spec.exclude)
    conversations: list[Conversation] = []
    total = min(spec.limit, len(positions)) if spec.limit is not None else len(positions)
    cursor = 0
    while cursor < len(positions) and (spec.limit is None or len(conversations) < spec.limit):
        size = _BATCH
        if spec.limit is not None:  # read little more than could still be needed
            size = min(_BATCH, max(16, 2 * (spec.limit - len(conversations))))
        batch = positions[cursor:cursor + size]
        cursor += len(batch)
        for index, value in zip(batch, src.values(batch, column)):
            report.rows_read += 1
            try:
                messages = normalize_row(value, spec.max_chars)
            except RowProblem as p:
                if spec.strict:
                    raise InputDataError(p.detail, path=src.path, row=index, reason=p.reason,
                                         hint="fix or drop the row; without strict mode bad "
                                              "rows are skipped and counted") from None
                report.bad_rows.append(BadRow(index=index, reason=p.reason, detail=p.detail))
                continue
            if excluded and prompt_sha256(messages) in excluded:
                report.excluded += 1
                continue
            conversations.append(Conversation(index=index, messages=messages))
            if spec.limit is not None and len(conversations) >= spec.limit:
                break
        elapsed = max(time.monotonic() - t0, 1e-9)
        events(Progress(stage="data", done=len(conversations), total=total, unit="conversations",
                        rate=len(conversations) / elapsed,
                        extra={"rows_read": report.rows_read, "bad_rows": len(report.bad_rows)}))
    report.conversations = len(conversations)
    bad = ", ".join(f"{k}: {v}" for k, v in report.counts.items()) or "none"
    held = f"; {report.excluded} held-out prompt(s) left out" if spec.exclude else ""
    events(Log(stage="data", level="warning" if report.bad_rows else "info",
               message=f"{report.conversations} conversations from {report.rows_read} rows; "
                       f"bad rows skipped: {bad}{held}"))
    return conversations, report
