"""torchrun on CPU (gloo): `eagle train --nproc 2` (DDP, and FSDP) against one process
accumulating the same global batch, and an FSDP resume."""

from __future__ import annotations

import shutil

import pytest
import torch

from core.train import train
from tests.train_support import (comparable, draft_weights, metric_lines, tiny_cfg,
                                 write_conversations)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
COMMON = ["--max-length", "96", "--max-tokens-per-batch", "192", "--ttt-length", "3",
          "--draft-vocab-size", "64", "--val-fraction", "0.2", "--lr", "1e-3",
          "--max-steps", str(STEPS), "--save-every", "3", "--keep-last", "2"]


def _cli(argv: list[str]) -> int:
    from eagle_tui.cli import main

    return main(argv)


def _close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_conversations(tmp_path / "convs.jsonl", n=40)
    one = tmp_path / "one"
    train(tiny_cfg(tiny_target, data, one, max_steps=STEPS, save_every=3, grad_accum=2))

    ddp = tmp_path / "ddp"
    base = ["train", "--target", str(tiny_target), "--data", str(data), *COMMON]
    assert _cli([*base, "-o", str(ddp), "--nproc", "2"]) == 0
    fsdp = tmp_path / "fsdp"
    assert _cli([*base, "-o", str(fsdp), "--nproc", "2", "--fsdp"]) == 0

    ref = metric_lines(one, "train")
    assert len(ref) == STEPS
    for run in (ddp, fsdp):
        got = metric_lines(run, "train")
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        for r, g in zip(ref, got):
            assert g["tokens"] == r["tokens"]  # the same global batch every step
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)
        assert [r["acc_0"] for r in metric_lines(run, "val")] == \
            pytest.approx([r["acc_0"] for r in metric_lines(one, "val")], abs=1e-6)
        _close(draft_weights(one / "checkpoints" / f"step-{STEPS}"),
               draft_weights(run / "checkpoints" / f"step-{STEPS}"))

    # FSDP resume: drop the last checkpoint as if the run died after step 3, continue it
    final = draft_weights(fsdp / "checkpoints" / f"step-{STEPS}")
    full_metrics = [comparable(r) for r in metric_lines(fsdp)]
    shutil.rmtree(fsdp / "checkpoints" / f"step-{STEPS}")
    (fsdp / "latest").write_text("checkpoints/step-3\n")
    assert _cli([*base, "-o", str(fsdp), "--nproc", "2", "--fsdp", "--resume"]) == 0
    resumed = draft_weights(fsdp / "checkpoints" / f"step-{STEPS}")
    for k in final:
        assert torch.equal(final[k], resumed[k]), k
    assert [comparable(r) for r in metric_lines(fsdp)] == full_metrics


def test_nproc_refusal_happens_before_any_process_starts(tiny_target, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "note.txt").write_text("x")
    data = write_conversations(tmp_path / "convs.jsonl", n=8)
    rc = _cli(["train", "--target", str(tiny_target), "--data", str(data), "-o", str(tmp_path / "run"),
               "--nproc", "2"])
    assert rc == 2 and "already holds files" in capsys.readouterr().err
