"""regenerate() against the fault-injecting server: retries, isolation, failover, failure cap,
formats, refusal rules and in-process resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import FailureLimitError, OutputExistsError, SettingsMismatchError
from core.events import ListSink, Progress, SampleFailed, ShardDone, StageFinished
from core.regen import AllServersDeadError, RegenConfig, regenerate
from core.target_server import free_port
from fault_server import FaultServer, read_output, write_conversations


@pytest.fixture
def fault():
    with FaultServer(retry_after="0.4", hang_s=5.0, max_lifetime_s=120) as srv:
        yield srv


def make_cfg(tmp_path: Path, inp: str, urls: list[str], **kw) -> RegenConfig:
    base = dict(input_data=inp, output_dir=str(tmp_path / "out"), model="tiny", servers=urls,
                shard_size=8, concurrency=4, request_timeout=0.5, max_retries=3,
                backoff_base=0.01, backoff_max=0.05, max_new_tokens=16)
    base.update(kw)
    return RegenConfig(**base)


def assert_exactly_once(directory, n: int) -> tuple[list[dict], list[dict]]:
    rows, fails = read_output(directory)
    seen = [r["index"] for r in rows] + [f["index"] for f in fails]
    assert sorted(seen) == list(range(n)), "every input sample exactly once in shards + failures"
    return rows, fails


def test_transient_faults_are_retried_until_they_succeed(tmp_path, fault):
    specs = [f"q{i}" for i in range(12)] + [
        "q12 fault=500x2", "q13 fault=503x1", "q14 fault=jsonx2", "q15 fault=dropx2",
        "q16 fault=hangx1", "q17 fault=429x1"]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    res = regenerate(make_cfg(tmp_path, inp, [fault.url]))
    rows, fails = assert_exactly_once(tmp_path / "out", len(specs))
    assert fails == [] and res.done == len(specs) and res.failed == 0
    by_index = {r["index"]: r for r in rows}
    for i, s in enumerate(specs):
        assert by_index[i]["messages"] == [{"role": "user", "content": s},
                                           {"role": "assistant", "content": f"A({s})"}]
        assert by_index[i]["original_messages"][-1] == {"role": "assistant", "content": f"old({s})"}
    assert {k: fault.counts[k] for k in ("q12", "q13", "q14", "q15", "q16", "q17", "q0")} == \
        {"q12": 3, "q13": 2, "q14": 3, "q15": 3, "q16": 2, "q17": 2, "q0": 1}
    assert res.retries == 2 + 1 + 2 + 2 + 1 + 1
    # Retry-After (0.4 s) is honoured although the backoff cap is 0.05 s
    t429 = [s.t for s in fault.seen("q17")]
    assert t429[1] - t429[0] >= 0.35


def test_failed_samples_are_isolated_and_recorded(tmp_path, fault):
    specs = [f"q{i}" for i in range(20)]
    specs[3], specs[5] = "q3 fault=400", "q5 fault=500xinf"
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    sink = ListSink()
    res = regenerate(make_cfg(tmp_path, inp, [fault.url], max_retries=2, max_failure_rate=0.5), sink)
    rows, fails = assert_exactly_once(tmp_path / "out", 20)
    assert len(rows) == 18 and (res.done, res.failed) == (18, 2)
    f = {x["index"]: x for x in fails}
    assert f[3]["kind"] == "failed" and f[3]["attempts"] == 1 and "HTTP 400" in f[3]["reason"]
    assert f[5]["attempts"] == 3 and "HTTP 500" in f[5]["reason"] and "gave up after 3" in f[5]["reason"]
    assert fault.counts["q3"] == 1 and fault.counts["q5"] == 3  # 4xx is never retried
    assert sorted(e.index for e in sink.of(SampleFailed)) == [3, 5]
    summary = sink.of(StageFinished)[-1].summary
    assert (summary["done"], summary["failed"], summary["skipped"]) == (18, 2, 0)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["complete"] is True and [s["samples"] for s in m["shards"]] == [6, 8, 4]


def test_failure_cap_stops_the_run_and_resume_finishes_it(tmp_path, fault):
    specs = [f"q{i} fault=400" if i % 2 else f"q{i}" for i in range(60)]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    cfg = make_cfg(tmp_path, inp, [fault.url], concurrency=2, min_attempts_for_rate=10)
    with pytest.raises(FailureLimitError) as e:
        regenerate(cfg)
    assert "HTTP 400" in str(e.value) and "--retry-failed" in str(e.value) and e.value.exit_code == 1
    sent_first = len(fault.requests)
    assert 10 <= sent_first < 60  # stopped early, after the minimum number of samples
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["complete"] is False
    # the limit is not a content setting: resume with a looser one finishes the job
    cfg.max_failure_rate, cfg.resume = 0.6, True
    res = regenerate(cfg)
    rows, fails = assert_exactly_once(tmp_path / "out", 60)
    assert len(rows) == 30 and all(f["kind"] == "failed" for f in fails)
    assert len(fault.requests) == 60  # nothing finished was sent again
    assert res.requested == 60 - sent_first


def test_failure_rate_is_judged_at_the_end_of_small_runs(tmp_path, fault):
    specs = [f"q{i}" for i in range(10)]
    specs[4] = "q4 fault=400"
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    with pytest.raises(FailureLimitError, match="1 of 10 samples failed"):
        regenerate(make_cfg(tmp_path, inp, [fault.url]))  # 10% > 5%, below the mid-run minimum
    assert_exactly_once(tmp_path / "out", 10)  # everything was still written
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["complete"] is False and m["extra"]["failure_limit_exceeded"] is True


def test_dead_server_is_dropped_and_the_others_carry_on(tmp_path, fault):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connections are refused
    inp = write_conversations(tmp_path / "in.jsonl", [f"q{i}" for i in range(24)])
    res = regenerate(make_cfg(tmp_path, inp, [dead, fault.url], dead_after=2))
    assert_exactly_once(tmp_path / "out", 24)
    assert res.done == 24 and res.dead_servers == [dead]
    assert sorted(fault.counts.values()) == [1] * 24


def test_all_servers_dead_is_a_clear_error(tmp_path):
    urls = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}"]
    inp = write_conversations(tmp_path / "in.jsonl", [f"q{i}" for i in range(5)])
    with pytest.raises(AllServersDeadError) as e:
        regenerate(make_cfg(tmp_path, inp, urls, dead_after=1))
    msg = str(e.value)
    assert urls[0] in msg and urls[1] + "/v1" in msg and "--resume" in msg and e.value.exit_code == 1


def test_sampling_reasoning_and_seed_reach_the_server(tmp_path, fault):
    inp = write_conversations(tmp_path / "in.jsonl", ["q0", "q1", "q2"])
    regenerate(make_cfg(tmp_path, inp, [fault.url], reasoning="save", temperature=0.7, top_p=0.9,
                        seed=11))
    rows, _ = read_output(tmp_path / "out")
    assert [r["reasoning"] for r in rows] == ["R(q0)", "R(q1)", "R(q2)"]
    bodies = {s.key: s.body for s in fault.requests}
    b = bodies["q0"]
    assert (b["model"], b["max_tokens"], b["temperature"], b["top_p"]) == ("tiny", 16, 0.7, 0.9)
    assert "chat_template_kwargs" not in b
    seeds = [bodies[k]["seed"] for k in ("q0", "q1", "q2")]
    assert len(set(seeds)) == 3  # one seed per sample, derived from --seed

    regenerate(make_cfg(tmp_path, inp, [fault.url], output_dir=str(tmp_path / "o2"),
                        reasoning="disable", temperature=0.7, top_p=0.9, seed=11))
    later = [s.body for s in fault.requests[3:]]
    assert all(x["chat_template_kwargs"] == {"enable_thinking": False} for x in later)
    assert sorted(x["seed"] for x in later) == sorted(seeds)  # same sample, same seed
    rows2, _ = read_output(tmp_path / "o2")
    assert "reasoning" not in rows2[0]  # only `save` keeps a reasoning column


def test_turns_modes_and_unusable_prompts(tmp_path, fault):
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
             {"role": "assistant", "content": "a2"}]
    empty_last = [{"role": "user", "content": "e1"}, {"role": "assistant", "content": "x"},
                  {"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]
    ends_user = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "w2"}]
    double = [{"role": "user", "content": "d1"}, {"role": "assistant", "content": "x"},
              {"role": "assistant", "content": "y"}]
    inp = write_conversations(tmp_path / "in.jsonl", [multi, empty_last, ends_user, double])

    res = regenerate(make_cfg(tmp_path, inp, [fault.url], turns="all"))
    rows, fails = assert_exactly_once(tmp_path / "out", 4)
    r = {x["index"]: x for x in rows}
    assert r[0]["messages"] == multi[:2] + [{"role": "assistant", "content": "A(u1)"}, multi[3],
                                            {"role": "assistant", "content": "A(u2)"}]
    assert r[0]["turns_regenerated"] == 2 and r[0]["original_messages"] == multi
    second = [s.body["messages"] for s in fault.seen("u1")][1]
    assert second[2] == {"role": "assistant", "content": "A(u1)"}  # regenerated history fed forward
    assert r[1]["messages"] == [empty_last[0], {"role": "assistant", "content": "A(e1)"}]
    assert r[2]["messages"] == [ends_user[0], {"role": "assistant", "content": "A(w1)"},
                                ends_user[2], {"role": "assistant", "content": "A(w2)"}]
    assert r[3]["messages"] == [double[0], {"role": "assistant", "content": "A(d1)"}]
    assert fails == [] and res.skipped == 0

    n_before = len(fault.requests)
    res = regenerate(make_cfg(tmp_path, inp, [fault.url], turns="last", output_dir=str(tmp_path / "o2")))
    rows, fails = assert_exactly_once(tmp_path / "o2", 4)
    r = {x["index"]: x for x in rows}
    assert r[0]["messages"] == multi[:4] + [{"role": "assistant", "content": "A(u2)"}]
    assert r[2]["messages"] == ends_user + [{"role": "assistant", "content": "A(w2)"}]
    skipped = {f["index"]: f for f in fails}
    assert skipped[1]["kind"] == "skipped" and skipped[1]["reason"] == "empty prompt turn"
    assert skipped[3]["reason"] == "prompt ends with an assistant turn"
    assert res.skipped == 2 and len(fault.requests) - n_before == 2  # skipped ones never sent


def test_bad_input_rows_are_counted_not_sent(tmp_path, fault):
    inp = tmp_path / "in.jsonl"
    write_conversations(inp, ["q0", "q1"])
    with open(inp, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    res = regenerate(make_cfg(tmp_path, str(inp), [fault.url]))
    rows, fails = assert_exactly_once(tmp_path / "out", 3)
    assert res.bad_rows == 1 and fails[0]["kind"] == "bad_row" and "no assistant turn" in fails[0]["reason"]
    assert len(fault.requests) == 2


def test_outputs_load_with_datasets_and_the_data_layer(tmp_path, fault):
    specs = [f"q{i}" for i in range(10)]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    sink = ListSink()
    regenerate(make_cfg(tmp_path, inp, [fault.url], shard_size=4, reasoning="save"), sink)
    out = tmp_path / "out"
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "shard-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 10 and set(ds.column_names) >= {
        "index", "messages", "original_messages", "finish_reason", "prompt_tokens",
        "completion_tokens", "reasoning"}
    assert sorted(ds["index"]) == list(range(10)) and ds[0]["finish_reason"] == "stop"
    from core.data import DataSpec, load_conversations

    convs, report = load_conversations(DataSpec(str(out)))
    assert len(convs) == 10 and not report.bad_rows
    assert sorted(c.messages[-1]["content"] for c in convs) == sorted(f"A({s})" for s in specs)
    # manifest: content settings only, with per-shard checksums
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "regen" and m["complete"] and len(m["shards"]) == 3
    assert {"input", "model", "temperature", "turns", "reasoning", "shard_size"} <= set(m["settings"])
    assert not {"concurrency", "request_timeout", "servers", "max_retries"} & set(m["settings"])
    from core.manifest import Manifest

    for rec in m["shards"]:
        Manifest.from_dict(m).verify_shard(out, rec)
    # events: per-sample progress with tokens/s, one ShardDone per shard, a summary
    prog = sink.of(Progress)
    prog = [p for p in prog if p.stage == "regen"]
    assert [p.done for p in prog] == list(range(1, 11)) and all("tokens_per_s" in p.extra for p in prog)
    assert sorted(e.shard for e in sink.of(ShardDone)) == [0, 1, 2]
    s = sink.of(StageFinished)[-1].summary
    assert s["done"] == 10 and s["tokens_generated"] == 10 and s["tokens_per_s"] > 0


def test_refusals_before_any_request(tmp_path, fault):
    inp = write_conversations(tmp_path / "in.jsonl", ["q0", "q1"])
    cfg = make_cfg(tmp_path, inp, [fault.url])
    regenerate(cfg)
    n = len(fault.requests)
    with pytest.raises(OutputExistsError, match="--resume") as e:
        regenerate(cfg)
    assert e.value.exit_code == 2
    changed = make_cfg(tmp_path, inp, [fault.url], resume=True, temperature=0.5, max_new_tokens=7)
    with pytest.raises(SettingsMismatchError) as e:
        regenerate(changed)
    assert set(e.value.fields) == {"temperature", "max_new_tokens"}
    assert "temperature" in str(e.value) and "max_new_tokens" in str(e.value)
    # transport settings may change on resume; a finished run sends nothing more
    res = regenerate(make_cfg(tmp_path, inp, [fault.url], resume=True, concurrency=1,
                              request_timeout=9.0, max_retries=0))
    assert res.requested == 0 and res.done == 2 and len(fault.requests) == n
    # a stranger's non-empty folder is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        regenerate(make_cfg(tmp_path, inp, [fault.url], output_dir=str(other)))
    assert len(fault.requests) == n


def test_resume_after_torn_journal_and_lost_shard(tmp_path, fault):
    specs = [f"q{i}" for i in range(20)]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    cfg = make_cfg(tmp_path, inp, [fault.url], concurrency=1)
    regenerate(cfg)
    out = tmp_path / "out"
    first_rows, _ = read_output(out)
    # simulate a kill: shard 1 never sealed, journal cut after 11 entries with a torn 12th
    journal = out / ".regen" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:11]) + lines[11][: len(lines[11]) // 2])
    (out / "shard-000001.parquet").unlink()
    (out / "shard-000002.parquet").unlink()
    (out / ".shard-000001.parquet.abc.tmp").write_bytes(b"half-written")
    n = len(fault.requests)
    cfg.resume = True
    sink = ListSink()
    res = regenerate(cfg, sink)
    assert res.requested == 9 and len(fault.requests) - n == 9  # only unfinished ones re-sent
    assert sorted(s.key for s in fault.requests[n:]) == sorted(f"q{i}" for i in range(11, 20))
    rows, fails = assert_exactly_once(out, 20)
    assert rows == first_rows and fails == []
    assert not list(out.glob(".*.tmp"))
    assert any("torn" in getattr(e, "message", "") for e in sink.events)


def test_a_moved_workdir_resumes_and_other_conversations_are_refused(tmp_path, fault):
    """The input is known by its conversations, not its path: a workdir moved with its dataset file
    resumes without a request; other conversations under the moved name are refused."""
    import os

    from core.manifest import load_manifest

    old = tmp_path / "old"
    old.mkdir()
    inp = write_conversations(old / "in.jsonl", [f"q{i}" for i in range(10)])
    regenerate(make_cfg(old, inp, [fault.url]))
    first, _ = read_output(old / "out")
    os.rename(old, tmp_path / "new")
    new = tmp_path / "new"
    n = len(fault.requests)
    res = regenerate(make_cfg(new, str(new / "in.jsonl"), [fault.url], resume=True))
    assert res.requested == 0 and len(fault.requests) == n and read_output(new / "out")[0] == first
    assert load_manifest(new / "out").extra["input_path"] == str(new / "in.jsonl")

    write_conversations(new / "in.jsonl", [f"other{i}" for i in range(10)])
    with pytest.raises(SettingsMismatchError, match="input content"):
        regenerate(make_cfg(new, str(new / "in.jsonl"), [fault.url], resume=True))
    assert len(fault.requests) == n and read_output(new / "out")[0] == first


def test_an_older_run_that_recorded_the_input_path_still_resumes_where_it_was(tmp_path, fault):
    from core.manifest import load_manifest

    inp = write_conversations(tmp_path / "in.jsonl", [f"q{i}" for i in range(6)])
    cfg = make_cfg(tmp_path, inp, [fault.url])
    regenerate(cfg)
    m = load_manifest(tmp_path / "out")
    m.settings["input"] = str(Path(inp).resolve())  # as versions before 2026-12-03 wrote it
    m.save(tmp_path / "out")
    n = len(fault.requests)
    cfg.resume = True
    assert regenerate(cfg).requested == 0 and len(fault.requests) == n


def test_a_moved_model_folder_resumes_and_another_model_is_refused(tmp_path, fault):
    """A local model folder is known by its config and weight files, not its path (as the cache
    knows it): the same model moved elsewhere resumes without a request; another one is refused,
    and a run that recorded the folder's path, as older versions did, resumes where it was."""
    import shutil

    from core.manifest import load_manifest

    model = tmp_path / "models" / "a"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    inp = write_conversations(tmp_path / "in.jsonl", [f"q{i}" for i in range(6)])
    regenerate(make_cfg(tmp_path, inp, [fault.url], model=str(model)))
    first, n = read_output(tmp_path / "out")[0], len(fault.requests)
    assert set(load_manifest(tmp_path / "out").settings["model"]) == {"config_hash", "weights_hash"}

    moved = shutil.move(model, tmp_path / "models" / "b")
    res = regenerate(make_cfg(tmp_path, inp, [fault.url], model=str(moved), resume=True))
    assert res.requested == 0 and len(fault.requests) == n and read_output(tmp_path / "out")[0] == first

    (Path(moved) / "model.safetensors").write_bytes(b"\0" * 65)  # other weights
    with pytest.raises(SettingsMismatchError, match="model"):
        regenerate(make_cfg(tmp_path, inp, [fault.url], model=str(moved), resume=True))
    (Path(moved) / "model.safetensors").write_bytes(b"\0" * 64)

    m = load_manifest(tmp_path / "out")
    m.settings["model"] = str(Path(moved).resolve())  # as earlier versions wrote it
    m.save(tmp_path / "out")
    res = regenerate(make_cfg(tmp_path, inp, [fault.url], model=str(moved), resume=True))
    assert res.requested == 0 and len(fault.requests) == n
    with pytest.raises(SettingsMismatchError, match="model"):  # such a run knows only the path
        regenerate(make_cfg(tmp_path, inp, [fault.url], model=str(shutil.copytree(moved, tmp_path / "c")),
                            resume=True))


def test_retry_failed_on_resume_sends_only_the_failed_samples_again(tmp_path, fault):
    specs = [f"q{i}" for i in range(12)]
    specs[2], specs[3], specs[9] = "q2 fault=500x3", "q3 fault=500x2", "q9 fault=400"
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    cfg = make_cfg(tmp_path, inp, [fault.url], max_retries=1, max_failure_rate=0.5)
    regenerate(cfg)
    _, fails = assert_exactly_once(tmp_path / "out", 12)
    assert sorted(f["index"] for f in fails) == [2, 3, 9] and fault.counts["q2"] == 2
    cfg.resume = True
    assert regenerate(cfg).requested == 0  # plain --resume: failures are finished samples
    cfg.retry_failed = True
    res = regenerate(cfg)
    assert res.requested == 3 and (res.done, res.failed) == (11, 1)
    rows, fails = assert_exactly_once(tmp_path / "out", 12)
    assert [f["index"] for f in fails] == [9] and fault.counts["q2"] == 4
    for i in (2, 3):  # two retried samples in one sealed shard: both land in the rebuilt shard
        assert next(r for r in rows if r["index"] == i)["messages"][-1]["content"] == f"A({specs[i]})"
    assert sum(fault.counts.values()) == 12 + 1 + 1 + 1 + 2 + 1  # nothing done was sent again
