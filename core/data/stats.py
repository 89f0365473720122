"""`eagle data inspect`: what a dataset holds, how long its conversations are, which rows are bad."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

from core.data import DataSpec, LoadReport, load_conversations
from core.data.types import BadRow
from core.errors import InputDataError
from core.events import EventSink, NullSink, Progress


def distribution(values: list[int]) -> dict[str, float] | None:
    """min / mean / p50 / p90 / max (nearest-rank percentiles)."""
    if not values:
        return None
    s = sorted(values)

    def pct(p: float) -> int:
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pct(50), "p90": pct(90), "max": s[-1]}


def inspect_data(spec: DataSpec, tokenizer=None, tokenizer_name: str | None = None,
                 events: EventSink | None = None) -> dict[str, Any]:
    """Counts, turns, length distribution (tokens of the chat-template render when a tokenizer is
    given, else characters of the contents) and bad rows by reason."""
    from core.tokenize import ChatTemplateError, tokenize_conversation

    events = events or NullSink()
    conversations, report = load_conversations(spec, events)
    roles: Counter[str] = Counter()
    lengths, supervised = [], 0
    kept = 0
    t0 = time.monotonic()
    for n, conv in enumerate(conversations, 1):
        if tokenizer is not None:
            try:
                tc = tokenize_conversation(tokenizer, conv.messages)
            except ChatTemplateError as e:  # e.g. content carrying the template's special tokens
                if spec.strict:
                    raise InputDataError(e.message, path=report.source, row=conv.index,
                                         reason="chat template") from None
                report.bad_rows.append(BadRow(conv.index, "chat template", e.message))
                continue
            lengths.append(len(tc.input_ids))
            supervised += tc.num_supervised
            if n % 500 == 0 or n == len(conversations):
                events(Progress(stage="data", done=n, total=len(conversations), unit="tokenized",
                                rate=n / max(time.monotonic() - t0, 1e-9)))
        else:
            lengths.append(sum(len(m["content"]) for m in conv.messages))
        roles.update(m["role"] for m in conv.messages)
        kept += 1
    turns = sum(roles.values())
    out: dict[str, Any] = {
        "source": report.source, "format": report.format, "messages_column": report.messages_column,
        "rows_in_source": report.rows_in_source, "rows_read": report.rows_read,
        "conversations": kept,
        "turns": {"total": turns, "per_conversation": round(turns / kept, 2) if kept else 0.0,
                  "by_role": dict(roles.most_common())},
        "length_unit": "tokens" if tokenizer is not None else "characters",
        "tokenizer": tokenizer_name,
        "length": distribution(lengths),
    }
    if tokenizer is not None:
        total = sum(lengths)
        out["supervised_tokens"] = supervised
        out["supervised_fraction"] = round(supervised / total, 4) if total else 0.0
    rep = report.to_dict(max_bad_rows=20)
    out["bad_rows_total"] = rep["bad_rows_total"]
    out["bad_rows_by_reason"] = rep["bad_rows_by_reason"]
    out["bad_rows"] = rep["bad_rows"]
    return out


def format_inspect(r: dict[str, Any], examples: int = 5) -> str:
    """The human rendering of `inspect_data`'s result."""
    lines = [f"source         {r['source']} ({r['format']}, column {r['messages_column']!r})",
             f"rows           {r['rows_in_source']} in source, {r['rows_read']} read",
             f"conversations  {r['conversations']}"]
    t = r["turns"]
    by_role = ", ".join(f"{k} {v}" for k, v in t["by_role"].items())
    lines.append(f"turns          {t['total']} ({by_role}); {t['per_conversation']} per conversation")
    unit = r["length_unit"] + (f", {r['tokenizer']}" if r.get("tokenizer") else "")
    d = r["length"]
    if d:
        lines.append(f"length ({unit}): min {d['min']}  mean {d['mean']}  p50 {d['p50']}  "
                     f"p90 {d['p90']}  max {d['max']}")
    if "supervised_tokens" in r:
        lines.append(f"supervised tokens (loss mask) {r['supervised_tokens']} "
                     f"({100 * r['supervised_fraction']:.1f}%)")
    lines.append(f"bad rows       {r['bad_rows_total']}")
    width = max((len(k) for k in r["bad_rows_by_reason"]), default=0)
    for reason, count in r["bad_rows_by_reason"].items():
        lines.append(f"  {reason:<{width}}  {count}")
    for b in r["bad_rows"][:examples]:
        lines.append(f"  e.g. row {b['index']}: {b['detail']}")
    return "\n".join(lines)


__all__ = ["inspect_data", "format_inspect", "distribution", "LoadReport"]
