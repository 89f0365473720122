"""Ctrl-C / SIGTERM during training: the current step finishes, is checkpointed, the run ends with
exit code 130, and `--resume` ends with the weights of an uninterrupted run; under torchrun every
process stops at the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.events import CallbackSink, StepMetrics
from core.train import train
from tests.train_support import (REPO, comparable, draft_weights, metric_lines,
                                 subprocess_env, tiny_cfg, write_conversations)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("interrupt_data") / "convs.jsonl", n=40)


def _signal_self_at(step: int, signum: int) -> CallbackSink:
    def on(ev):
        if isinstance(ev, StepMetrics) and ev.split == "train" and ev.step == step:
            os.kill(os.getpid(), signum)  # delivered now, in the middle of the run's event handling
    return CallbackSink(on)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_the_current_step_and_resume_matches(tiny_target, data, tmp_path, signum):
    kw = dict(max_steps=8, save_every=100, keep_last=1)  # no periodic checkpoint before the signal
    ref = train(tiny_cfg(tiny_target, data, tmp_path / "ref", **kw))
    previous = signal.getsignal(signum)

    run = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_target, data, run, **kw), _signal_self_at(3, signum))
    assert signal.getsignal(signum) is previous  # handlers are put back
    assert (run / "latest").read_text().strip() == "checkpoints/step-3"
    assert max(r["step"] for r in metric_lines(run, "train")) == 3

    res = train(tiny_cfg(tiny_target, data, run, resume=True, **kw))
    assert res.resumed_from == 3 and res.steps == ref.steps == 8
    a, b = draft_weights(tmp_path / "ref" / "checkpoints" / "step-8"), draft_weights(run / "checkpoints" / "step-8")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [comparable(r) for r in metric_lines(run)] == [comparable(r) for r in metric_lines(tmp_path / "ref")]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_exits_130_with_one_agreed_checkpoint(tiny_target, data, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "eagle_tui.cli", "train", "--target", str(tiny_target), "--data", str(data),
            "-o", str(run), "--max-length", "96", "--max-tokens-per-batch", "192", "--ttt-length", "2",
            "--draft-vocab-size", "64", "--val-fraction", "0.2", "--max-steps", "400", "--save-every", "1000",
            "--nproc", "2"]
    proc = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not [r for r in _train_lines(run) if r["step"] >= 2]:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "torchrun never reached step 2"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal (or Cancel in the TUI) sends
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    latest = (run / "latest").read_text().strip()
    step = int(latest.rsplit("-", 1)[1])
    assert 2 <= step < 400 and "continue with --resume" in out
    assert max(r["step"] for r in _train_lines(run)) == step  # no rank ran past the agreed step

    # exact resume after such a stop: test_signal_checkpoints_the_current_step_and_resume_matches


def _train_lines(run: Path) -> list[dict]:
    return metric_lines(run, "train") if (run / "metrics.jsonl").exists() else []
