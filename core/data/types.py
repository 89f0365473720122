"""The data layer's public types: what to load (DataSpec), what comes back (Conversation,
LoadReport)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core.data.validate import DEFAULT_MAX_CHARS
from core.errors import UsageError


@dataclass
class DataSpec:
    """A chat dataset to load.

    source: a local .json/.jsonl/.parquet file, a folder of parquet shards (our regenerate
        output included), a `datasets.save_to_disk` folder, a hub dataset name, or "demo" (the
        embedded ShareGPT sample, core.assets.demo_dataset, unless a local path of that name exists).
    split: split name with an optional slice, e.g. "train", "train[:1000]", "train[10%:20%]",
        "[:100]" (local files have the single split "train").
    messages_column: the column holding the turns; default: "messages", else "conversations".
    shuffle_seed: shuffle the selected rows with this seed (None keeps the source order).
    limit: stop once this many valid conversations are loaded (bad rows are skipped, counted).
    strict: fail at the first bad row instead of skipping it.
    max_chars: conversations longer than this (all turns' characters) are bad rows ("too long").
    exclude: a JSONL file of conversations (e.g. a pipeline's heldout.jsonl) whose prompts are left
        out, matched by prompt identity (core.data.identity) before `limit` counts: held-out
        evaluation prompts, and their duplicates, never train.
    """

    source: str
    split: str | None = None
    messages_column: str | None = None
    shuffle_seed: int | None = None
    limit: int | None = None
    strict: bool = False
    max_chars: int = DEFAULT_MAX_CHARS
    exclude: str | None = None

    def __post_init__(self) -> None:
        self.source = str(self.source)
        if not self.source.strip():
            raise UsageError("the data source is empty; give a file, a folder or a hub dataset name")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be at least 1, got {self.limit}")
        if self.max_chars < 1:
            raise UsageError(f"max_chars must be at least 1, got {self.max_chars}")
        if self.split is not None:
            from core.data.split import parse_split

            parse_split(self.split)  # validate early: a typo fails before anything is read


@dataclass
class Conversation:
    index: int  # row position in the source (0-based), stable under split slicing and shuffling
    messages: list[dict]  # [{"role": "system"|"user"|"assistant"|"tool", "content": str}]


@dataclass
class BadRow:
    index: int
    reason: str  # short category, counted in LoadReport.counts
    detail: str  # names the turn / line and the value at fault


@dataclass
class LoadReport:
    source: str
    format: str = ""
    messages_column: str | None = None
    rows_in_source: int = 0
    rows_read: int = 0  # rows looked at (after split, shuffle; may stop early at `limit`)
    conversations: int = 0
    excluded: int = 0  # valid rows left out because their prompt is in `DataSpec.exclude`
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Bad rows by reason, most frequent first."""
        return dict(Counter(b.reason for b in self.bad_rows).most_common())

    def to_dict(self, max_bad_rows: int | None = 100) -> dict[str, Any]:
        rows = self.bad_rows if max_bad_rows is None else self.bad_rows[:max_bad_rows]
        return {"source": self.source, "format": self.format,
                "messages_column": self.messages_column, "rows_in_source": self.rows_in_source,
                "rows_read": self.rows_read, "conversations": self.conversations,
                "excluded": self.excluded,
                "bad_rows_total": len(self.bad_rows), "bad_rows_by_reason": self.counts,
                "bad_rows": [{"index": b.index, "reason": b.reason, "detail": b.detail} for b in rows]}
