"""One writer per output folder (core.locking): a second writer exits 2 naming the holder, a
killed holder leaves no stale lock, and the lock file never counts as output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import locking
from core.errors import OutputExistsError
from core.manifest import has_output, load_manifest, prepare_output_dir
from fault_server import FaultServer, read_output, write_conversations

EAGLE = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()"]
REPO = Path(__file__).resolve().parents[1]


def hold_in_child(folder: Path, lock_file: Path | None = None) -> subprocess.Popen:
    """Another process that takes the folder's lock and sleeps."""
    code = ("import sys, time; from core import locking; "
            f"locking.acquire({str(folder)!r}, {str(lock_file) if lock_file else None!r}); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_taking_it_twice_in_one_process_is_a_no_op(tmp_path):
    d = tmp_path / "out"
    assert locking.acquire(d) is True
    assert locking.acquire(d) is False and locking.is_held(d)
    with locking.held(d):  # already held: stays held after the block
        pass
    assert locking.is_held(d)
    info = json.loads((d / locking.LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and "command" in info
    locking.release(d)
    assert not locking.is_held(d) and locking.holder(d) is None
    with locking.held(d):
        assert locking.is_held(d)
    assert not locking.is_held(d)


@pytest.mark.slow
def test_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    d = tmp_path / "out"
    proc = hold_in_child(d)
    try:
        with pytest.raises(locking.FolderLockedError) as e:
            locking.acquire(d)
        assert e.value.exit_code == 2 and str(d) in str(e.value)
        assert f"pid {proc.pid}" in str(e.value) and "time.sleep" in str(e.value)
        assert locking.holder(d).startswith(f"pid {proc.pid}")
        with pytest.raises(locking.FolderLockedError):  # prepare_output_dir takes it too
            prepare_output_dir(d, "regen", 1, {}, resume=True)
    finally:
        proc.kill()
        proc.wait()
    assert (d / locking.LOCK_FILE).exists()  # the file stays; the lock died with the process
    assert locking.holder(d) is None
    m, resumed = prepare_output_dir(d, "regen", 1, {"a": 1}, resume=False)  # only a lock file: empty
    assert not resumed and locking.is_held(d)
    locking.release(d)


def test_lock_file_is_not_output(tmp_path):
    d = tmp_path / "out"
    m, _ = prepare_output_dir(d, "cache", 1, {"x": 1}, resume=False)
    assert (d / locking.LOCK_FILE).exists() and has_output(d)  # manifest.json
    (d / "shard-000000.safetensors").write_bytes(b"abc")
    m.add_shard(d, "shard-000000.safetensors", 1)
    m.save(d)
    assert [s["file"] for s in load_manifest(d).shards] == ["shard-000000.safetensors"]
    m2, resumed = prepare_output_dir(d, "cache", 1, {"x": 1}, resume=True)  # re-entrant, same process
    assert resumed and m2.shards == m.shards
    locking.release(d)
    only_lock = tmp_path / "only-lock"
    only_lock.mkdir()
    (only_lock / locking.LOCK_FILE).write_text("")
    assert not has_output(only_lock)


def test_someone_elses_folder_is_refused_without_leaving_a_lock_file(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        prepare_output_dir(d, "regen", 1, {}, resume=False)
    assert sorted(p.name for p in d.iterdir()) == ["a.jpg"]


@pytest.mark.slow
def test_export_refuses_a_second_writer(tmp_path):
    from core.export import ExportConfig, export_draft, export_lock_file

    out = tmp_path / "export"
    src = tmp_path / "run"
    src.mkdir()
    proc = hold_in_child(out, export_lock_file(out))
    try:
        with pytest.raises(locking.FolderLockedError, match=f"pid {proc.pid}"):
            export_draft(ExportConfig(source=str(src), output_dir=str(out)))
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # the export folder itself appears only whole


@pytest.mark.slow
def test_two_regen_processes_into_one_folder(tmp_path):
    """The issue's report: a second `eagle regen --resume` into a folder being written exits 2 with
    one line naming the folder and the first process; after a kill -9 of the first, --resume
    finishes with every sample exactly once."""
    n = 60
    specs = [f"q{i}" for i in range(n)]
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    out = tmp_path / "out"
    with FaultServer(delay_s=0.3, max_lifetime_s=120) as srv:
        argv = ["regen", "--input-data", inp, "--output-dir", str(out), "--model", "tiny",
                "--target-server", srv.url, "--shard-size", "10"]
        # one request at a time: the first writer is still busy (~18 s) when the second starts
        first = subprocess.Popen([*EAGLE, *argv, "--concurrency", "1"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, cwd=REPO)
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "first regen did not start"
            time.sleep(0.05)
        second = subprocess.run([*EAGLE, *argv, "--resume"], capture_output=True, text=True,
                                timeout=120, cwd=REPO)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and str(out) in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert "being written by another process" in lines[0]
        assert first.poll() is None  # the first writer is untouched
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        third = subprocess.run([*EAGLE, *argv, "--resume", "--concurrency", "8"], capture_output=True,
                               text=True, timeout=120, cwd=REPO)
        assert third.returncode == 0, third.stderr
    rows, fails = read_output(out)
    assert sorted(r["index"] for r in rows) == list(range(n)) and not fails
    assert all(r["messages"][-1]["content"] == f"A(q{r['index']})" for r in rows)
