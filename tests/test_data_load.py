"""Chat data layer: sources, normalization, validation, split/shuffle/limit, strict mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import DataSpec, load_conversations, parse_split
from core.errors import InputDataError, UsageError
from core.events import ListSink, Log, Progress


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, text in (raw_lines or {}).items():
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def contents(convs) -> list[str]:
    return [c.messages[-1]["content"] for c in convs]


# --------------------------------------------------------------------------- sources

def test_jsonl_messages(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i), "extra": i} for i in range(5)])
    convs, rep = load_conversations(DataSpec(str(f)))
    assert [c.index for c in convs] == [0, 1, 2, 3, 4]
    assert convs[2].messages == conv(2)
    assert (rep.format, rep.messages_column, rep.rows_in_source, rep.conversations) == ("jsonl", "messages", 5, 5)
    assert rep.bad_rows == [] and rep.counts == {}


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_object(tmp_path, wrap):
    rows = [{"messages": conv(i)} for i in range(3)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"data": rows} if wrap else rows))
    convs, rep = load_conversations(DataSpec(str(f)))
    assert contents(convs) == ["answer 0", "answer 1", "answer 2"] and rep.format == "json"


def test_sharegpt_rows_are_normalized(tmp_path):
    sg = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
          {"from": "gpt", "value": "hello"}, {"from": "human", "value": "search"},
          {"from": "bing", "value": "found"}, {"from": "tool", "value": "42"},
          {"from": "chatgpt", "value": "ok"}, {"from": "human", "value": "?"}, {"from": "bard", "value": "!"}]
    f = write_jsonl(tmp_path / "sg.jsonl", [{"id": "a", "conversations": sg}])
    convs, rep = load_conversations(DataSpec(str(f)))
    assert rep.messages_column == "conversations"
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant", "user", "assistant",
                                                      "tool", "assistant", "user", "assistant"]
    assert convs[0].messages[2] == {"role": "assistant", "content": "hello"}


def test_parquet_file_and_messages_column(tmp_path):
    f = write_parquet(tmp_path / "d.parquet", [{"chat": conv(i), "messages": "not turns"} for i in range(4)])
    convs, rep = load_conversations(DataSpec(str(f), messages_column="chat"))
    assert contents(convs) == [f"answer {i}" for i in range(4)] and rep.format == "parquet"
    with pytest.raises(InputDataError, match=r"no column 'nope' \(columns: chat, messages\)"):
        load_conversations(DataSpec(str(f), messages_column="nope"))


def test_missing_messages_column_names_the_columns(tmp_path):
    f = write_parquet(tmp_path / "d.parquet", [{"text": "x", "label": 1}])
    with pytest.raises(InputDataError, match=r"d.parquet: no 'messages' or 'conversations' column "
                                             r"\(columns: text, label\).*--messages-column"):
        load_conversations(DataSpec(str(f)))


def test_regen_output_folder_of_parquet_shards(tmp_path):
    out = tmp_path / "regen"
    out.mkdir()
    for s in range(2):
        write_parquet(out / f"shard-{s:06d}.parquet",
                      [{"index": 10 * s + i, "messages": conv(10 * s + i),
                        "original_messages": conv(999), "finish_reason": "stop"} for i in range(3)])
    (out / "manifest.json").write_text("{}")
    (out / "failures.jsonl").write_text(json.dumps({"index": 5, "reason": "timeout"}) + "\n")
    convs, rep = load_conversations(DataSpec(str(out)))
    assert rep.format == "parquet-folder" and rep.messages_column == "messages"
    assert contents(convs) == ["answer 0", "answer 1", "answer 2", "answer 10", "answer 11", "answer 12"]
    assert [c.index for c in convs] == list(range(6))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"messages": conv(i)} for i in range(6)])
    test = datasets.Dataset.from_list([{"messages": conv(100 + i)} for i in range(2)])
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    convs, rep = load_conversations(DataSpec(str(tmp_path / "one"), split="train[2:4]"))
    assert rep.format == "saved-dataset" and contents(convs) == ["answer 2", "answer 3"]
    convs, _ = load_conversations(DataSpec(str(tmp_path / "dict")))  # defaults to train
    assert len(convs) == 6
    convs, _ = load_conversations(DataSpec(str(tmp_path / "dict"), split="test"))
    assert contents(convs) == ["answer 100", "answer 101"]
    with pytest.raises(InputDataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_conversations(DataSpec(str(tmp_path / "dict"), split="validation"))


def test_mixed_turn_schemas_in_arrow_are_normalized(tmp_path):
    # Arrow unifies {role, content} and {from, value} structs, filling absent keys with None.
    f = write_parquet(tmp_path / "m.parquet", [
        {"messages": [{"role": "user", "content": "a", "from": None, "value": None},
                      {"role": None, "content": None, "from": "gpt", "value": "b"}]}])
    convs, _ = load_conversations(DataSpec(str(f)))
    assert convs[0].messages == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


# --------------------------------------------------------------------------- missing / offline

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputDataError, match=r"nothere\.jsonl: no such file or folder") as e:
        load_conversations(DataSpec(str(tmp_path / "nothere.jsonl")))
    assert e.value.exit_code == 2 and e.value.path.endswith("nothere.jsonl")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputDataError, match=r"some-org/chat-data: no such file or folder, and hub "
                                             r"access is off"):
        load_conversations(DataSpec("some-org/chat-data"))


def test_unsupported_files_and_folders(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(InputDataError, match="unsupported file type '.txt'"):
        load_conversations(DataSpec(str(tmp_path / "d.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no parquet shards"):
        load_conversations(DataSpec(str(tmp_path / "empty")))
    (tmp_path / "bad.json").write_text('[{"messages": []},')
    with pytest.raises(InputDataError, match=r"bad.json: not valid JSON: .*line 1"):
        load_conversations(DataSpec(str(tmp_path / "bad.json")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(InputDataError, match="not a readable parquet file"):
        load_conversations(DataSpec(str(tmp_path / "bad.parquet")))


# --------------------------------------------------------------------------- validation

BAD_ROWS = [
    ({"messages": conv(0)}, None),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "beep"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]}, "non-string content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q"}]}, "starts with assistant"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a" * 60}]}, "too long"),
    ({"messages": [{"speaker": "user", "text": "q"}]}, "malformed turn"),
    ({"messages": "just a string"}, "malformed turn"),
    ({"messages": None}, "empty conversation"),
    ({"conversation": conv(1)}, "missing messages"),
    (["not", "an", "object"], "malformed row"),
    ({"messages": conv(2)}, None),
]


def test_every_bad_row_is_skipped_and_counted_by_reason(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [r for r, _ in BAD_ROWS])
    convs, rep = load_conversations(DataSpec(str(f), max_chars=100))
    assert [c.index for c in convs] == [0, 12]
    expected = [(i, reason) for i, (_, reason) in enumerate(BAD_ROWS) if reason]
    assert [(b.index, b.reason) for b in rep.bad_rows] == expected
    assert rep.counts == {"malformed turn": 2, "empty conversation": 2, "unknown role": 1,
                          "non-string content": 1, "starts with assistant": 1, "no assistant turn": 1,
                          "too long": 1, "missing messages": 1, "malformed row": 1}
    details = {b.reason: b.detail for b in rep.bad_rows}
    assert "unknown role 'robot' in turn 1" in details["unknown role"]
    assert "turn 1 (assistant) has int content" in details["non-string content"]
    assert "110 characters (limit 100" in details["too long"]
    assert rep.to_dict()["bad_rows_by_reason"] == rep.counts


def test_strict_fails_at_the_first_bad_row_naming_row_and_reason(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [r for r, _ in BAD_ROWS])
    with pytest.raises(InputDataError) as e:
        load_conversations(DataSpec(str(f), strict=True))
    assert e.value.row == 1 and e.value.reason == "empty conversation"
    assert str(e.value).startswith(f"{f}, row 1: the conversation has no turns")
    f2 = write_jsonl(tmp_path / "d2.jsonl", [BAD_ROWS[0][0], BAD_ROWS[2][0]])
    with pytest.raises(InputDataError, match=r"d2.jsonl, row 1: unknown role 'robot' in turn 1"):
        load_conversations(DataSpec(str(f2), strict=True))


def test_malformed_jsonl_line_is_a_bad_row_or_a_strict_error(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i)} for i in range(3)],
                    raw_lines={2: '{"messages": [oops', 1: ""})  # a blank line is not a row
    convs, rep = load_conversations(DataSpec(str(f)))
    assert contents(convs) == ["answer 0", "answer 1", "answer 2"]
    assert [(b.index, b.reason) for b in rep.bad_rows] == [(2, "malformed JSON")]
    assert rep.bad_rows[0].detail.startswith("line 4 is not valid JSON: Expecting value")
    with pytest.raises(InputDataError, match=r"d.jsonl, row 2: line 4 is not valid JSON"):
        load_conversations(DataSpec(str(f), strict=True))
    g = tmp_path / "notjsonl.jsonl"
    g.write_text("hello\nworld\n")
    with pytest.raises(InputDataError, match=r"no line is valid JSON \(line 1"):
        load_conversations(DataSpec(str(g)))


# --------------------------------------------------------------------------- split / shuffle / limit

@pytest.fixture
def hundred(tmp_path) -> Path:
    return write_jsonl(tmp_path / "h.jsonl", [{"messages": conv(i)} for i in range(100)])


@pytest.mark.parametrize("split,expected", [
    ("train[:3]", [0, 1, 2]), ("[:3]", [0, 1, 2]), ("train[10%:13%]", [10, 11, 12]),
    ("train[-2:]", [98, 99]), ("train[97:]", [97, 98, 99]), ("train", list(range(100))),
])
def test_split_slicing(hundred, split, expected):
    convs, rep = load_conversations(DataSpec(str(hundred), split=split))
    assert [c.index for c in convs] == expected and rep.rows_in_source == 100


def test_bad_split_strings(hundred):
    with pytest.raises(UsageError, match="cannot read the split"):
        DataSpec(str(hundred), split="train[1:2:3]")
    with pytest.raises(UsageError, match="between -100% and 100%"):
        parse_split("train[:150%]")
    with pytest.raises(InputDataError, match="single split 'train', not 'test'"):
        load_conversations(DataSpec(str(hundred), split="test[:5]"))


def test_shuffle_is_seeded_and_limit_counts_valid_conversations(hundred, tmp_path):
    a, _ = load_conversations(DataSpec(str(hundred), shuffle_seed=7, limit=10))
    b, _ = load_conversations(DataSpec(str(hundred), shuffle_seed=7, limit=10))
    c, _ = load_conversations(DataSpec(str(hundred), shuffle_seed=8, limit=10))
    assert [x.index for x in a] == [x.index for x in b] != [x.index for x in c]
    full, _ = load_conversations(DataSpec(str(hundred), shuffle_seed=7))
    assert sorted(x.index for x in full) == list(range(100))
    assert [x.index for x in full[:10]] == [x.index for x in a]

    rows = [{"messages": []} if i % 2 else {"messages": conv(i)} for i in range(40)]
    f = write_jsonl(tmp_path / "half.jsonl", rows)
    convs, rep = load_conversations(DataSpec(str(f), limit=5))
    assert [x.index for x in convs] == [0, 2, 4, 6, 8]  # bad rows do not count toward the limit
    assert rep.rows_read == 9 and rep.counts == {"empty conversation": 4}
    with pytest.raises(UsageError, match="limit must be at least 1"):
        DataSpec(str(f), limit=0)


def test_events_report_progress_and_a_summary(hundred):
    sink = ListSink()
    load_conversations(DataSpec(str(hundred), limit=30), events=sink)
    progress = sink.of(Progress)
    assert progress and progress[-1].done == 30 and progress[-1].total == 30
    logs = [e.message for e in sink.of(Log)]
    assert any("h.jsonl" in m for m in logs) and "30 conversations from 30 rows" in logs[-1]


def test_demo_dataset_loads_with_sharegpt_bad_rows_counted():
    from core.assets import demo_dataset

    convs, rep = load_conversations(DataSpec(str(demo_dataset())))
    assert rep.rows_in_source == 17671
    assert rep.conversations == len(convs) == 17671 - len(rep.bad_rows)
    # ShareGPT splits long chats into parts; the later parts start with the assistant.
    assert rep.counts["starts with assistant"] > 5000 and rep.counts["empty conversation"] > 100
    assert all(c.messages[0]["role"] in ("user", "system") for c in convs)


def test_demo_source_name_means_the_embedded_sample():
    from core.assets import demo_dataset

    convs, rep = load_conversations(DataSpec("demo", limit=3))
    assert rep.source == str(demo_dataset()) and len(convs) == 3
