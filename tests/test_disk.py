"""Disk space on a real size-limited folder (a small tmpfs): a step whose estimate does not fit is
refused with the numbers before anything is written; a disk that fills up anyway stops the step
with one line naming the file, the free space and the command that resumes, and --resume then
finishes on a bigger disk with the same result as an uninterrupted run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import disk
from eagle_tui.cli import common
from fault_server import FaultServer, read_output, write_conversations

EAGLE = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()"]
REPO = Path(__file__).resolve().parents[1]


class SmallFs:
    """A tmpfs of a given size mounted on a fresh folder (root only; unmounted afterwards)."""

    def __init__(self, where: Path):
        self.path = where
        self.mounted = False

    def mount(self, size: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" if not self.mounted else f"remount,size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        self.mounted = True
        return self.path


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    fs = SmallFs(tmp_path / "fs")
    yield fs
    if fs.mounted:
        subprocess.run(["umount", "-l", str(fs.path)], check=False)


def _isolated_env() -> None:
    os.environ.pop(disk.IGNORE_ENV, None)


def test_resume_command_and_error_line():
    argv = ["--events", "jsonl", "regen", "--input-data", "a b.jsonl", "--output-dir", "out"]
    assert common.resume_command(argv) == ("eagle --events jsonl regen --input-data 'a b.jsonl' "
                                           "--output-dir out --resume")
    assert common.resume_command(["train", "--resume", "--output-dir", "r"]).count("--resume") == 1
    assert common.resume_command(["export", "run", "-o", "x"]) == "eagle export run -o x"
    err = disk.DiskFullError("/fs/out/shard-000001.parquet", 4096, "/fs")
    line = common.error_line(err, ["cache", "--output", "c"])
    assert line == ("no space left on device writing /fs/out/shard-000001.parquet (4.1 KB free on /fs); "
                    "free some space, then run: eagle cache --output c --resume")
    assert "\n" not in line
    # a library that names no file: the command's output folder is named instead
    bare = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                        "message: \"No space left on device\" })")
    args = ["train", "--output-dir", "/nonexistent/run"]
    err = disk.full_disk_error(bare, common.output_of(args))
    assert disk.is_full_disk(bare) and common.error_line(err, args).startswith(
        "no space left on device writing a file under /nonexistent/run (")


def test_regen_refuses_with_the_numbers_before_writing(small_fs, tmp_path):
    from core.regen import RegenConfig, regenerate

    _isolated_env()
    fs = small_fs.mount("200k")
    inp = write_conversations(tmp_path / "in.jsonl", [f"q{i}" for i in range(300)])
    out = fs / "out"
    cfg = RegenConfig(input_data=inp, output_dir=str(out), model="tiny", servers=["http://127.0.0.1:9/v1"],
                      max_new_tokens=512)
    with pytest.raises(disk.DiskSpaceError) as e:
        regenerate(cfg)  # no server is listening: the refusal comes before any socket
    msg = str(e.value)
    assert e.value.exit_code == 1 and e.value.needed > e.value.free and not e.value.during_run
    assert msg.startswith("not enough disk space for regenerating 300 samples")
    assert f"free at {fs}" in msg and "--ignore-disk-check" in msg and "\n" not in msg
    assert not out.exists()  # nothing written, so the same command works once there is room


@pytest.mark.slow
def test_regen_full_disk_mid_run_then_resume(small_fs, tmp_path):
    """The issue's case: `eagle regen` on a 200 KB tmpfs. With the check overridden it runs until
    the disk is full, says which file, how much is free and what to run; on a bigger disk that
    command finishes: every sample exactly once, the answers of an uninterrupted run."""
    fs = small_fs.mount("200k")
    n = 300
    specs = [f"q{i} " + "pad " * 120 for i in range(n)]  # ~1 KB per sample and answer
    inp = write_conversations(tmp_path / "in.jsonl", specs)
    out = fs / "out"
    env = {k: v for k, v in os.environ.items() if k != disk.IGNORE_ENV}
    with FaultServer(max_lifetime_s=200) as srv:
        argv = ["regen", "--input-data", inp, "--output-dir", str(out), "--model", "tiny",
                "--target-server", srv.url, "--shard-size", "20", "--concurrency", "4",
                "--max-new-tokens", "16"]
        refused = subprocess.run([*EAGLE, *argv], capture_output=True, text=True, timeout=120,
                                 cwd=REPO, env=env)
        assert refused.returncode == 1 and "not enough disk space" in refused.stderr
        assert not out.exists()
        full = subprocess.run([*EAGLE, *argv, "--ignore-disk-check"], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env=env)
        assert full.returncode == 1, full.stderr
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith(f"error: no space left on device writing {out}/"), line
        assert f"free on {fs})" in line and "then run: eagle regen" in line
        resume = shlex.split(line.split("then run: ", 1)[1])
        assert resume[0] == "eagle" and resume[-1] == "--resume" and "--ignore-disk-check" in resume
        small_fs.mount("20m")  # more room, same folder
        done = subprocess.run([*EAGLE, *resume[1:]], capture_output=True, text=True, timeout=180,
                              cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr
    rows, fails = read_output(out)
    assert not fails and sorted(r["index"] for r in rows) == list(range(n))
    assert all(r["messages"][-1]["content"] == f"A({specs[r['index']]})" for r in rows)


def _cache_cfg(target, data, out, **kw):
    from core.cache import CacheConfig

    return CacheConfig(target=str(target), data=str(data), output_dir=str(out), draft_vocab_size=48,
                       max_length=128, shard_size=2, batch_tokens=128, aux_dtype="fp8",
                       target_store="topk", topk=8, **kw)


def test_cache_refuses_with_the_numbers_then_a_full_disk_stays_resumable(small_fs, tiny_target, tmp_path):
    import torch

    from core.cache import build_cache
    from feature_support import write_conversations as write_convs

    _isolated_env()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same numerics for both builds, and a quiet shared CPU
    data = write_convs(tmp_path / "convs.jsonl", 24, max_sentences=1)
    clean = tmp_path / "clean"
    full = build_cache(_cache_cfg(tiny_target, data, clean))
    fs = small_fs.mount(f"{(full.bytes // 2) // 4096 * 4096}")  # room for about half the shards
    out = fs / "cache"
    with pytest.raises(disk.DiskSpaceError) as e:
        build_cache(_cache_cfg(tiny_target, data, out))
    assert e.value.needed >= full.bytes and f"free at {fs}" in str(e.value)
    assert not out.exists()
    os.environ[disk.IGNORE_ENV] = "1"
    try:
        with pytest.raises(disk.DiskFullError) as e2:
            build_cache(_cache_cfg(tiny_target, data, out))
    finally:
        _isolated_env()
    assert str(out) in e2.value.path and "no space left on device writing" in str(e2.value)
    assert not list(out.glob(".*.tmp"))  # the cut write left nothing behind
    small_fs.mount("20m")
    res = build_cache(_cache_cfg(tiny_target, data, out, resume=True))
    assert res.resumed and 0 < res.shards_written < res.shards
    for p in sorted(clean.glob("shard-*.safetensors")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    torch.set_num_threads(threads)


def test_checkpoint_refuses_when_it_does_not_fit(small_fs):
    import torch

    from core.train.checkpoint import save_checkpoint

    _isolated_env()
    fs = small_fs.mount("64k")
    w = {"fc.weight": torch.zeros(100, 100)}
    opt = {"state": {0: {"exp_avg": torch.zeros(100, 100), "exp_avg_sq": torch.zeros(100, 100)}},
           "param_groups": []}
    with pytest.raises(disk.DiskSpaceError) as e:
        save_checkpoint(fs / "run", 3, w, opt, {}, {}, keep_last=2)
    assert e.value.during_run and "checkpoint step 3" in str(e.value) and "--resume" in str(e.value)
    assert not list((fs / "run" / "checkpoints").iterdir())


def test_the_runs_embedding_file_refuses_when_it_does_not_fit(small_fs):
    import torch

    from core.train.checkpoint import EMBED_FILE, write_run_embeddings

    _isolated_env()
    fs = small_fs.mount("64k")
    (fs / "run").mkdir()
    with pytest.raises(disk.DiskSpaceError) as e:
        write_run_embeddings(fs / "run", torch.zeros(256, 128))  # 128 KB
    assert "embedding file" in str(e.value) and "needs about" in str(e.value)
    assert not (fs / "run" / EMBED_FILE).exists()
    write_run_embeddings(fs / "run", torch.zeros(16, 128))  # 8 KB fits
    assert (fs / "run" / EMBED_FILE).is_file()


def test_a_journal_line_cut_by_a_full_disk_is_taken_back(small_fs):
    from core.regen.journal import Journal

    fs = small_fs.mount("8k")
    path = fs / "journal.jsonl"
    j = Journal(path).open()
    with pytest.raises(OSError) as e:
        for i in range(100):
            j.append({"index": i, "status": "done", "text": "x" * 700})
    j.close()
    assert disk.is_full_disk(e.value) and e.value.filename == str(path)
    again = Journal(path)
    assert sorted(again.load()) == list(range(i)) and again.torn_bytes == 0  # whole lines only
    assert path.read_bytes().endswith(b"\n")


@pytest.mark.slow
def test_the_tmpfs_tests_in_a_user_namespace_when_not_root():
    """Without root, the tests above run again as the mapped root of a user namespace, where a
    tmpfs can be mounted (unshare -rm); they are skipped only where that is not allowed either."""
    if os.geteuid() == 0:
        pytest.skip("root: the tests above mounted their tmpfs directly")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here (unshare -rm)")
    r = subprocess.run(["unshare", "-rm", sys.executable, "-m", "pytest", __file__, "-q", "-p",
                        "no:cacheprovider", "-k", "not user_namespace", "-rs"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0 and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-3000:]


@pytest.mark.slow
def test_a_full_disk_in_a_cache_worker_process_names_the_file(small_fs, tiny_target, tmp_path):
    """With --nproc 2 the full disk happens in a spawned worker: the parent still says which file
    and how much is free, and the folder resumes."""
    from core.cache import build_cache
    from feature_support import write_conversations as write_convs

    _isolated_env()
    data = write_convs(tmp_path / "convs.jsonl", 24, max_sentences=1)
    full = build_cache(_cache_cfg(tiny_target, data, tmp_path / "clean"))
    fs = small_fs.mount(f"{(full.bytes // 2) // 4096 * 4096}")
    out = fs / "cache"
    os.environ[disk.IGNORE_ENV] = "1"
    try:
        with pytest.raises(disk.DiskFullError) as e:
            build_cache(_cache_cfg(tiny_target, data, out, nproc=2, device="cpu"))
    finally:
        _isolated_env()
    assert "no space left on device writing" in str(e.value) and str(out) in str(e.value)
    small_fs.mount("20m")
    res = build_cache(_cache_cfg(tiny_target, data, out, nproc=2, device="cpu", resume=True))
    assert res.resumed and res.shards_written < res.shards
