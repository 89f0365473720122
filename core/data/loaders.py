"""Open a chat data source as rows addressable by position.

A source knows its row count and its columns, and hands back the values of one column at given
positions; a row that could not even be parsed (a malformed JSONL line, a row that is not an
object) comes back as a RowProblem instead of a value. Tables (parquet, saved datasets, hub) read
only the messages column, at the positions asked for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.data.normalize import AUTO_COLUMNS, RowProblem
from core.errors import InputDataError

DEMO = "demo"  # source name of the embedded demo dataset
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".arrow", ".csv")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Source:
    kind: str  # json, jsonl, parquet, parquet-folder, saved-dataset, hub
    path: str
    columns: list[str]
    num_rows: int
    values: Callable[[list[int], str], list[Any]]  # (positions, column) -> values or RowProblem


def open_source(source: str, split_name: str | None) -> Source:
    p = Path(source).expanduser()
    if source == DEMO and not p.exists():  # the embedded ShareGPT sample (core.assets)
        from core.assets import demo_dataset

        p = demo_dataset()
        source = str(p)
    if p.is_dir():
        return _open_folder(p, split_name)
    if p.is_file():
        _local_split_only(source, split_name)
        suffix = p.suffix.lower()
        if suffix == ".jsonl" or suffix == ".ndjson":
            return _open_jsonl(p)
        if suffix == ".json":
            return _open_json(p)
        if suffix == ".parquet":
            return _open_parquet([p], source, "parquet")
        raise InputDataError(f"unsupported file type {suffix or '(none)'!r}", path=source,
                             hint="use .json, .jsonl, .parquet, a folder of parquet shards, "
                                  "a datasets.save_to_disk folder or a hub dataset name")
    if source.lower().endswith(_FILE_SUFFIXES) or source.startswith(("/", ".", "~")) \
            or not _HUB_NAME.match(source):
        raise InputDataError("no such file or folder", path=source)
    return _open_hub(source, split_name)


def _local_split_only(source: str, split_name: str | None) -> None:
    if split_name not in (None, "train"):
        raise InputDataError(f"a local file has the single split 'train', not {split_name!r}",
                             path=source, hint="use e.g. train[:1000] or [:1000]")


# --------------------------------------------------------------------------- JSON / JSONL

def _row_columns(rows: list[Any]) -> list[str]:
    """Columns of a list of JSON rows: the keys of the first object row."""
    first = next((r for r in rows if isinstance(r, dict)), None)
    return sorted(first) if first else []


def _dict_values(rows: list[Any]) -> Callable[[list[int], str], list[Any]]:
    def values(positions: list[int], column: str) -> list[Any]:
        out = []
        for i in positions:
            row = rows[i]
            if isinstance(row, RowProblem):
                out.append(row)
            elif not isinstance(row, dict):
                out.append(RowProblem("malformed row", f"the row is a {type(row).__name__}, not an object"))
            elif column not in row:
                names = ", ".join(sorted(map(str, row))) or "none"
                out.append(RowProblem("missing messages", f"the row has no {column!r} field (fields: {names})"))
            else:
                out.append(row[column])
        return out

    return values


def _open_json(p: Path) -> Source:
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputDataError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                             path=str(p), reason="malformed JSON",
                             hint="a file with one JSON object per line should be named .jsonl") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"cannot read the file: {e}", path=str(p)) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputDataError("expected a JSON list of rows or an object with a \"data\" list",
                             path=str(p))
    return Source("json", str(p), _row_columns(data), len(data), _dict_values(data))


def _open_jsonl(p: Path) -> Source:
    rows: list[Any] = []
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(RowProblem("malformed JSON", f"line {lineno} is not valid JSON: "
                                                             f"{e.msg} (column {e.colno})"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"cannot read the file: {e}", path=str(p)) from e
    if rows and all(isinstance(r, RowProblem) for r in rows):
        raise InputDataError(f"no line is valid JSON ({rows[0].detail})", path=str(p), row=0,
                             reason="malformed JSON", hint="is this really a JSON Lines file?")
    return Source("jsonl", str(p), _row_columns(rows), len(rows), _dict_values(rows))


# --------------------------------------------------------------------------- tables

def _table_values(get_column: Callable[[str, list[int]], list[Any]]):
    def values(positions: list[int], column: str) -> list[Any]:
        return get_column(column, positions) if positions else []

    return values


def _open_parquet(files: list[Path], source: str, kind: str) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schemas = [pq.read_schema(f) for f in files]
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    except (pa.ArrowInvalid, OSError) as e:
        raise InputDataError(f"not a readable parquet file: {e}", path=source) from e
    columns = list(schemas[0].names)
    cache: dict[str, Any] = {}

    def get_column(column: str, positions: list[int]) -> list[Any]:
        if column not in cache:  # read just this column of every shard, once
            try:
                parts = [pq.read_table(f, columns=[column]).column(0) for f in files]
            except (pa.ArrowInvalid, KeyError, OSError) as e:
                raise InputDataError(f"cannot read column {column!r}: {e}", path=source) from e
            cache[column] = pa.chunked_array([c for part in parts for c in part.chunks],
                                             type=parts[0].type)
        return cache[column].take(pa.array(positions, pa.int64())).to_pylist()

    return Source(kind, source, columns, sum(counts), _table_values(get_column))


def _dataset_source(ds, source: str, kind: str) -> Source:
    def get_column(column: str, positions: list[int]) -> list[Any]:
        return ds.select(positions).with_format("arrow")[column].to_pylist()

    return Source(kind, source, list(ds.column_names), len(ds), _table_values(get_column))


def _open_folder(p: Path, split_name: str | None) -> Source:
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises several types for damaged folders
            raise InputDataError(f"cannot load the saved dataset: {e}", path=str(p)) from e
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, split_name, str(p))
        else:
            _local_split_only(str(p), split_name)
        return _dataset_source(ds, str(p), "saved-dataset")
    shards = sorted(p.glob("shard-*.parquet")) or sorted(p.glob("*.parquet")) \
        or sorted(p.rglob("*.parquet"))
    if not shards:
        raise InputDataError("the folder holds no parquet shards and no datasets.save_to_disk "
                             "output", path=str(p))
    _local_split_only(str(p), split_name)
    return _open_parquet(shards, str(p), "parquet-folder")


def _pick_split(dd, split_name: str | None, source: str):
    names = list(dd.keys())
    if split_name is None:
        split_name = "train" if "train" in names else (names[0] if len(names) == 1 else None)
        if split_name is None:
            raise InputDataError(f"the dataset has splits {', '.join(names)}; name one",
                                 path=source, hint="e.g. --split train[:1000]")
    if split_name not in names:
        raise InputDataError(f"no split {split_name!r} (splits: {', '.join(names)})", path=source)
    return dd[split_name]


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _open_hub(name: str, split_name: str | None) -> Source:
    if _offline():
        raise InputDataError("no such file or folder, and hub access is off "
                             "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)", path=name,
                             hint="give a local file or folder, or unset the offline variables")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split_name or "train")
    except Exception as e:  # network errors, unknown names, gated datasets, bad splits
        raise InputDataError(f"not a local file or folder, and the hub dataset could not be "
                             f"loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             path=name) from e
    return _dataset_source(ds, name, "hub")


def pick_source_column(src: Source, wanted: str | None) -> str:
    """The messages column of a source, or a clear error naming the columns it has."""
    if wanted:
        if src.kind in ("json", "jsonl") or wanted in src.columns:
            return wanted  # JSON rows may differ: a row without it is recorded as a bad row
        raise InputDataError(f"no column {wanted!r} (columns: {', '.join(src.columns) or 'none'})",
                             path=src.path)
    found = next((c for c in AUTO_COLUMNS if c in src.columns), None)
    if found is None:
        raise InputDataError(f"no {' or '.join(repr(c) for c in AUTO_COLUMNS)} column "
                             f"(columns: {', '.join(src.columns) or 'none'})", path=src.path,
                             hint="name the column holding the turns with --messages-column")
    return found
