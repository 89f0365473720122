"""Training runs on the tiny target: run directory, metrics and events, refusals, offline mode,
loading a trained draft, and exact resume after `kill -9`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import OutputExistsError, SettingsMismatchError, UsageError
from core.events import CheckpointSaved, ListSink, StageFinished, StageStarted, StepMetrics
from core.model import Eagle3Draft
from core.train import train
from tests.train_support import (REPO, comparable, draft_weights, metric_lines,
                                 subprocess_env, tiny_cfg, write_conversations)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("train_data") / "convs.jsonl", n=40)


@pytest.fixture(scope="module")
def finished_run(tiny_target, data, tmp_path_factory):
    """A finished online run: 10 steps, checkpoints every 4, keep 2."""
    out = tmp_path_factory.mktemp("runs") / "run"
    sink = ListSink()
    result = train(tiny_cfg(tiny_target, data, out, max_steps=10), sink)
    return out, result, sink


def test_run_directory_layout_and_manifest(finished_run, tiny_target):
    out, result, _ = finished_run
    assert (out / "latest").read_text().strip() == "checkpoints/step-10"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-8"]
    for name in ("draft.safetensors", "optimizer.safetensors", "optimizer.json", "state.json",
                 "draft_config.json"):
        assert (out / "checkpoints" / "step-10" / name).is_file(), name
    assert (out / "vocab" / "vocab.safetensors").is_file() and (out / "embed_tokens.safetensors").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "train" and m["complete"] is True
    assert m["settings"]["ttt_length"] == 3 and m["settings"]["device"] == "cpu"
    assert m["extra"]["aux_layer_ids"] == [0, 1, 2]  # a 4-layer target: [0, (N-2)//2, N-2]
    assert m["extra"]["draft_config"]["draft_vocab_size"] == 64
    assert m["extra"]["target"] == str(tiny_target.resolve()) and m["extra"]["mode"] == "online"
    state = json.loads((out / "checkpoints" / "step-10" / "state.json").read_text())
    assert state["step"] == 10 and state["scheduler"]["total_steps"] == 10
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert result.steps == 10 and result.resumed_from is None


def test_metrics_file_and_events(finished_run):
    out, result, sink = finished_run
    train_lines = metric_lines(out, "train")
    assert [r["step"] for r in train_lines] == list(range(1, 11))
    for key in ("loss", "loss_0", "loss_2", "acc_0", "acc_2", "tau_sim", "lr", "grad_norm",
                "tokens_per_s", "tokens", "epoch"):
        assert key in train_lines[0], key
    assert all(r["tau_sim"] >= 1.0 for r in train_lines)
    assert train_lines[0]["lr"] > train_lines[-1]["lr"]  # cosine decay
    val_steps = [r["step"] for r in metric_lines(out, "val")]
    assert val_steps == [0, 4, 8, 10]  # start, every save_every (default eval cadence), end
    started = sink.of(StageStarted)
    assert started and started[0].total == 10 and started[0].stage == "train"
    steps = sink.of(StepMetrics)
    assert {e.split for e in steps} == {"train", "val"}
    assert [e.step for e in sink.of(CheckpointSaved)] == [4, 8, 10]
    summary = sink.of(StageFinished)[-1].summary
    assert summary["steps"] == 10 and summary["tokens_per_s"] > 0
    assert summary["val_acc_0_first"] == metric_lines(out, "val")[0]["acc_0"]
    assert result.tokens == sum(int(r["tokens"]) for r in train_lines)


def test_from_pretrained_loads_a_run_and_a_step_dir(finished_run, tiny_target):
    out, _, _ = finished_run
    draft, info = Eagle3Draft.from_pretrained(out, with_info=True)
    assert info.step == 10 and info.checkpoint_dir == out / "checkpoints" / "step-10"
    assert info.aux_layer_ids == [0, 1, 2] and info.vocab_dir == out / "vocab"
    assert info.target == str(tiny_target.resolve())
    saved = draft_weights(out / "checkpoints" / "step-10")
    sd = draft.state_dict()
    assert all(torch.equal(sd[k], saved[k]) for k in saved)
    from safetensors.torch import load_file

    target_embed = load_file(str(tiny_target / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(sd["embed_tokens.weight"], target_embed)
    assert torch.equal(draft.d2t, info.load_vocab().d2t)
    older, info8 = Eagle3Draft.from_pretrained(out / "checkpoints" / "step-8", with_info=True)
    assert info8.step == 8 and info8.run_dir == out
    assert not torch.equal(older.fc.weight, draft.fc.weight)


def test_refusals(finished_run, tiny_target, data, tmp_path):
    out, _, _ = finished_run
    with pytest.raises(OutputExistsError, match="already holds earlier output"):
        train(tiny_cfg(tiny_target, data, out, max_steps=10))
    with pytest.raises(SettingsMismatchError, match=r"lr \(on disk 0.001, now 0.002\)"):
        train(tiny_cfg(tiny_target, data, out, max_steps=10, lr=2e-3, resume=True))
    # resuming a finished run with the same settings does nothing (and changes nothing)
    before = draft_weights(out / "checkpoints" / "step-10")
    r = train(tiny_cfg(tiny_target, data, out, max_steps=10, save_every=5, resume=True))
    assert r.resumed_from == 10 and r.tokens == 0
    after = draft_weights(out / "checkpoints" / "step-10")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same settings over other data: refused, naming what differs
    other = write_conversations(tmp_path / "other.jsonl", n=40, seed=1)
    other_run = tmp_path / "run"
    train(tiny_cfg(tiny_target, other, other_run, max_steps=2, val_fraction=0.0))
    other.write_text(data.read_text())
    with pytest.raises(SettingsMismatchError, match="data|vocab"):
        train(tiny_cfg(tiny_target, other, other_run, max_steps=2, val_fraction=0.0, resume=True))


def test_a_moved_run_and_dataset_resume(finished_run, tiny_target, data, tmp_path):
    """The dataset is known by its content, not its path: a workdir moved or renamed with its data
    resumes (a run that recorded the path, as older versions did, too); other data is refused."""
    import shutil

    out, _, _ = finished_run
    moved, moved_data = tmp_path / "moved-run", tmp_path / "moved.jsonl"
    shutil.copytree(out, moved)
    shutil.copy(data, moved_data)
    assert json.loads((moved / "manifest.json").read_text())["settings"]["data"] == "(by content)"
    r = train(tiny_cfg(tiny_target, moved_data, moved, max_steps=10, resume=True))
    assert r.resumed_from == 10 and r.tokens == 0
    m = json.loads((moved / "manifest.json").read_text())
    m["settings"]["data"] = str(data.resolve())  # as versions before 2026-12-03 wrote it
    (moved / "manifest.json").write_text(json.dumps(m))
    assert train(tiny_cfg(tiny_target, moved_data, moved, max_steps=10, resume=True)).resumed_from == 10
    write_conversations(moved_data, n=40, seed=1)
    with pytest.raises(SettingsMismatchError, match="data|vocab"):
        train(tiny_cfg(tiny_target, moved_data, moved, max_steps=10, resume=True))


def test_a_moved_target_folder_resumes_and_another_target_is_refused(finished_run, tiny_target, data,
                                                                      tmp_path):
    """The target folder is known by its config and weight files (as the cache knows it), not its
    path: the same model copied elsewhere resumes; one with another config is refused."""
    import shutil

    out, _, _ = finished_run
    run, target = tmp_path / "run", tmp_path / "models" / "target"
    shutil.copytree(out, run)
    shutil.copytree(tiny_target, target)
    assert set(json.loads((run / "manifest.json").read_text())["settings"]["target"]) == {
        "config_hash", "weights_hash"}
    assert train(tiny_cfg(target, data, run, max_steps=10, resume=True)).resumed_from == 10
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(SettingsMismatchError, match="target"):
        train(tiny_cfg(target, data, run, max_steps=10, resume=True))
    (target / "config.json").write_text(json.dumps(cfg))
    m = json.loads((run / "manifest.json").read_text())
    m["settings"]["target"] = str(target.resolve())  # as earlier versions wrote it: kept for them
    (run / "manifest.json").write_text(json.dumps(m))
    assert train(tiny_cfg(target, data, run, max_steps=10, resume=True)).resumed_from == 10
    with pytest.raises(SettingsMismatchError, match="target"):
        train(tiny_cfg(tiny_target, data, run, max_steps=10, resume=True))


def test_cli_refusal_is_one_line_with_exit_2(finished_run, tiny_target, data, capsys):
    from eagle_tui.cli import main

    out, _, _ = finished_run
    rc = main(["train", "--target", str(tiny_target), "--data", str(data), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "--resume" in err[0]
    rc = main(["train", "--target", str(tiny_target), "--data", str(data), "--cache", str(out),
               "-o", str(out / "x")])
    assert rc == 2 and "exactly one of --data" in capsys.readouterr().err


def test_cli_help_documents_scaling_and_depth():
    from typer.testing import CliRunner

    from eagle_tui.cli import app

    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "torchrun --nnodes" in text and "--nproc" in text and "--fsdp" in text
    assert "Deeper drafts" in text and "--resume" in text


def test_offline_training_reads_the_cache_only(tiny_target, data, tmp_path):
    from core.cache import CacheConfig, CacheReader, build_cache

    cache = tmp_path / "cache"
    build_cache(CacheConfig(target=str(tiny_target), data=str(data), output_dir=str(cache),
                            draft_vocab_size=64, max_length=96, batch_tokens=192, device="cpu"))
    out = tmp_path / "run"
    sink = ListSink()
    from core.train import TrainConfig

    cfg = TrainConfig(output_dir=str(out), cache=str(cache), max_length=96, max_tokens_per_batch=192,
                      ttt_length=2, max_steps=3, save_every=3, tensorboard=False)
    result = train(cfg, sink)
    assert result.steps == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["extra"]["mode"] == "offline" and m["extra"]["cache"] == str(cache.resolve())
    reader = CacheReader(cache)
    draft, info = Eagle3Draft.from_pretrained(out, with_info=True)
    assert info.aux_layer_ids == reader.target_info["aux_layer_ids"]
    assert torch.equal(draft.d2t, reader.vocab.d2t)
    with pytest.raises(UsageError, match="--draft-vocab-size"):
        TrainConfig(output_dir=str(tmp_path / "r2"), cache=str(cache), draft_vocab_size=32).validate()
    # --limit N offline: the cache's first N samples, and only they are recorded as trained on
    from core.data.identity import read_prompt_list

    small = tmp_path / "small"
    train(cfg.model_copy(update=dict(output_dir=str(small), data_limit=5, max_steps=1, save_every=1)), ListSink())
    sm = json.loads((small / "manifest.json").read_text())
    assert sm["extra"]["data_fingerprint"]["samples"] == 5
    assert [r["index"] for r in read_prompt_list(small / "trained_on.jsonl")] == \
        [r["index"] for r in read_prompt_list(cache / "conversations.jsonl")][:5]


# ---- kill -9 and resume --------------------------------------------------------------------------
_WORKER = """
import json, sys, time
from core.events import CallbackSink, StepMetrics
from core.train import TrainConfig, train

cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
stop_at, flag = int(sys.argv[2]), sys.argv[3]

def on(ev):
    # a run that is past its last checkpoint, stuck mid-way: the test kills it here with SIGKILL
    if isinstance(ev, StepMetrics) and ev.split == "train" and ev.step == stop_at:
        open(flag, "w").close()
        time.sleep(600)

train(cfg, CallbackSink(on))
"""


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tiny_target, data, tmp_path):
    # with feature noise: the resumed steps must draw the same noise as the uninterrupted run
    kw = dict(epochs=2, grad_accum=2, save_every=4, keep_last=1, feature_noise=0.2)
    ref = train(tiny_cfg(tiny_target, data, tmp_path / "ref", **kw))
    assert ref.steps > 7

    run = tmp_path / "killed"
    flag = tmp_path / "stuck"
    cfg = tiny_cfg(tiny_target, data, run, **kw)
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(cfg.to_dict()), "6", str(flag)],
                            cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the training subprocess never reached step 6"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (run / "latest").read_text().strip() == "checkpoints/step-4"
    assert max(r["step"] for r in metric_lines(run, "train")) == 6  # steps 5, 6 are lost work

    res = train(tiny_cfg(tiny_target, data, run, resume=True, **kw))
    assert res.resumed_from == 4 and res.steps == ref.steps
    a = draft_weights(tmp_path / "ref" / "checkpoints" / f"step-{ref.steps}")
    b = draft_weights(run / "checkpoints" / f"step-{res.steps}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics history is the uninterrupted one too (no duplicated or missing steps)
    assert [comparable(r) for r in metric_lines(run)] == \
        [comparable(r) for r in metric_lines(tmp_path / "ref")]


def test_resume_before_the_first_checkpoint_restarts_cleanly(tiny_target, data, tmp_path):
    kw = dict(max_steps=3, save_every=3, val_fraction=0.2)
    run = tmp_path / "run"
    train(tiny_cfg(tiny_target, data, run, **kw))
    first = draft_weights(run / "checkpoints" / "step-3")
    lines = [comparable(r) for r in metric_lines(run)]
    # as if killed before its first checkpoint: manifest, vocab and metrics exist, no checkpoint
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "latest").unlink()
    res = train(tiny_cfg(tiny_target, data, run, resume=True, **kw))
    assert res.resumed_from is None and res.steps == 3
    again = draft_weights(run / "checkpoints" / "step-3")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [comparable(r) for r in metric_lines(run)] == lines
