"""kill -9 during `eagle cache`, then --resume: shards bitwise identical to an uninterrupted run;
`--nproc 2`: disjoint shards from two processes, one merged manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from core.cache import CacheConfig, CacheReader, build_cache
from core.events import ListSink, ShardDone
from feature_support import write_conversations

pytestmark = pytest.mark.timeout(300)
ARGS = ["--draft-vocab-size", "48", "--max-length", "128", "--shard-size", "2", "--batch-tokens", "128",
        "--aux-dtype", "fp8", "--target-store", "topk", "--topk", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here and in the child: same numerics on both sides, and no OpenMP
    spinning on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(target, data, out, **kw) -> CacheConfig:
    return CacheConfig(target=str(target), data=str(data), output_dir=str(out), draft_vocab_size=48,
                       max_length=128, shard_size=2, batch_tokens=128, aux_dtype="fp8", target_store="topk",
                       topk=8, **kw)


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(tiny_target, tmp_path):
    data = write_conversations(tmp_path / "convs.jsonl", 40, max_sentences=1)
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()", "--events", "jsonl", "cache",
           "--target", str(tiny_target), "--data", str(data), "--output", str(killed), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    shards_seen = 0
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["event"] == "shard_done":
            shards_seen += 1
            if shards_seen == 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < 20

    sink = ListSink()
    res = build_cache(_cfg(tiny_target, data, killed, resume=True), sink)
    assert res.resumed and res.shards == 20 and res.shards_written == 20 - len(manifest["shards"])
    assert not list(killed.glob(".*.tmp"))

    clean = tmp_path / "clean"
    build_cache(_cfg(tiny_target, data, clean))
    names = sorted(p.name for p in clean.glob("shard-*.safetensors"))
    assert len(names) == 20 and names == sorted(p.name for p in killed.glob("shard-*.safetensors"))
    for n in names:
        assert (killed / n).read_bytes() == (clean / n).read_bytes(), n
    for n in ("vocab.safetensors", "target_config.json"):
        assert (killed / n).read_bytes() == (clean / n).read_bytes(), n
    a, b = json.loads((killed / "manifest.json").read_text()), json.loads((clean / "manifest.json").read_text())
    assert a["settings"] == b["settings"] and a["shards"] == b["shards"]


def test_nproc_2_splits_shards_and_merges_manifest(tiny_target, tmp_path):
    data = write_conversations(tmp_path / "convs.jsonl", 10, max_sentences=1)
    one, two = tmp_path / "one", tmp_path / "two"
    build_cache(_cfg(tiny_target, data, one))
    sink = ListSink()
    res = build_cache(_cfg(tiny_target, data, two, nproc=2), sink)
    assert res.shards == 5 and sorted(e.shard for e in sink.of(ShardDone)) == [0, 1, 2, 3, 4]
    m = json.loads((two / "manifest.json").read_text())
    assert m["complete"] and m["extra"]["provenance"]["nproc"] == 2 and len(m["shards"]) == 5
    r1, r2 = CacheReader(one), CacheReader(two)
    assert r1.lengths == r2.lengths
    for i in range(len(r1)):
        x, y = r1[i], r2[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
        torch.testing.assert_close(x["aux_hidden"], y["aux_hidden"], rtol=0.07, atol=1e-4)
        torch.testing.assert_close(x["target_probs"], y["target_probs"], rtol=1e-2, atol=1e-3)
