"""Output files of a regeneration (design.md "Formats"): parquet shards and failures.jsonl.

Shards hold the samples of one block of `shard_size` input positions that were regenerated;
failed and skipped samples of the block (and the loader's bad rows) go to failures.jsonl, so every
input sample is in exactly one of the two. Both are written atomically (temp file + os.replace).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from core.manifest import atomic_path, write_bytes_atomic

FAILURES = "failures.jsonl"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.parquet"


def shard_schema(with_reasoning: bool) -> pa.Schema:
    cols = [("index", pa.int64()), ("messages", pa.list_(MESSAGE)),
            ("original_messages", pa.list_(MESSAGE)), ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
            ("turns_regenerated", pa.int32())]
    if with_reasoning:
        cols.append(("reasoning", pa.string()))
    return pa.schema(cols)


def _messages(msgs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in msgs]


def write_shard(path: str | Path, rows: list[dict[str, Any]], with_reasoning: bool) -> None:
    """rows: dicts with index, messages, original_messages, finish_reason, usage, reasoning."""
    rows = sorted(rows, key=lambda r: r["index"])
    schema = shard_schema(with_reasoning)
    data: dict[str, list] = {
        "index": [int(r["index"]) for r in rows],
        "messages": [_messages(r["messages"]) for r in rows],
        "original_messages": [_messages(r["original_messages"]) for r in rows],
        "finish_reason": [r.get("finish_reason") for r in rows],
        "prompt_tokens": [int(r.get("prompt_tokens") or 0) for r in rows],
        "completion_tokens": [int(r.get("completion_tokens") or 0) for r in rows],
        "turns_regenerated": [int(r.get("turns_regenerated") or 1) for r in rows],
    }
    if with_reasoning:
        data["reasoning"] = [r.get("reasoning") for r in rows]
    table = pa.Table.from_pydict(data, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_failures(directory: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """failures.jsonl, sorted by index: {index, kind (failed|skipped|bad_row), reason, attempts}."""
    buf = io.StringIO()
    for r in sorted(records, key=lambda r: r["index"]):
        buf.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    path = Path(directory) / FAILURES
    write_bytes_atomic(path, buf.getvalue().encode())
    return path


