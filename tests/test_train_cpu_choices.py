"""Automatic CPU choices of the training loop that touch numerics: the fused AdamW kernel (the CPU
default) trains to the losses and weights of the per-parameter loop within float32 rounding, and
the malloc setting changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

from core.train.loop import ADAMW_ENV, adamw_impl
from tests.train_support import draft_weights, metric_lines, tiny_cfg, write_conversations

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adamw_choice_by_device_and_environment(monkeypatch):
    monkeypatch.delenv(ADAMW_ENV, raising=False)
    assert adamw_impl(torch.device("cpu")) == {"fused": True}
    assert adamw_impl(torch.device("cpu"), fsdp=True) == {"foreach": True}
    assert adamw_impl(torch.device("cuda")) == {"foreach": True}
    monkeypatch.setenv(ADAMW_ENV, "loop")
    assert adamw_impl(torch.device("cpu")) == {"foreach": False}


def test_fused_adamw_trains_like_the_loop(tiny_target, tmp_path, monkeypatch):
    from core.train import train

    data = write_conversations(tmp_path / "convs.jsonl", n=30)
    runs = {}
    for impl, malloc in (("loop", "0"), ("fused", "1")):
        monkeypatch.setenv(ADAMW_ENV, impl)
        monkeypatch.setenv("EAGLE_CPU_MALLOC", malloc)
        out = tmp_path / impl
        train(tiny_cfg(tiny_target, data, out, max_steps=8, save_every=8, eval_every=4))
        runs[impl] = out
    a, b = metric_lines(runs["loop"], "train"), metric_lines(runs["fused"], "train")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    va, vb = metric_lines(runs["loop"], "val"), metric_lines(runs["fused"], "val")
    assert [v["loss"] for v in va] == pytest.approx([v["loss"] for v in vb], rel=1e-4)
    wa, wb = draft_weights(runs["loop"] / "checkpoints" / "step-8"), draft_weights(runs["fused"] / "checkpoints" / "step-8")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
