"""Online training with the target forward of the next micro-batch overlapped with the draft step
(core.train.overlap): the very batches, losses and weights of the plain path, on CPU (forced on
with EAGLE_OVERLAP_TARGET=1; CUDA uses it by default, with a side stream)."""

from __future__ import annotations

import pytest
import torch

from core.train.data import BatchPlan, OnlineSource
from core.train.overlap import ENV, OverlappedBatches, overlap_wanted
from tests.train_support import comparable, draft_weights, metric_lines, tiny_cfg, write_conversations

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("overlap_data") / "convs.jsonl", n=24)


@pytest.fixture(scope="module")
def online_source(tiny_target):
    from core.features import TargetFeatureExtractor
    from core.vocab import build_vocab

    from transformers import AutoConfig

    v = int(AutoConfig.from_pretrained(tiny_target).vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, v, (int(n),), generator=g) for n in torch.randint(5, 40, (14,), generator=g)]
    masks = [torch.arange(t.numel()) >= t.numel() // 3 for t in ids]
    vocab = build_vocab(list(zip(ids, masks)), 64, v)
    ext = TargetFeatureExtractor(str(tiny_target), vocab, device="cpu")
    yield OnlineSource(ids, masks, ext)
    ext.close()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_overlapped_batches_equal_the_plain_ones_in_schedule_order(online_source):
    plan = BatchPlan(online_source.lengths, 80, seed=3, grad_accum=2)
    cpu = torch.device("cpu")
    total = plan.total_steps(2)
    want = {(s, j): online_source.batch(mb, cpu) for s in range(total)
            for j, mb in enumerate(plan.step(s).micro_batches)}
    for start in (0, 2):  # a fresh run and a resumed one
        ov = OverlappedBatches(online_source, plan, start, total, cpu)
        try:
            for step in range(start, total):
                for j, mb in enumerate(plan.step(step).micro_batches):
                    if step == start + 1 and j == 0:
                        ov.drain()  # what the loop does before validation, which uses the target
                        online_source.batch(plan.step(0).micro_batches[0], cpu)
                    _same(ov.get(step, j, mb), want[step, j])
            assert ov.misses == 0 and ov.hits == sum(len(plan.step(s).micro_batches) for s in range(start, total))
        finally:
            ov.close()


def test_off_schedule_request_is_computed_in_place(online_source):
    plan = BatchPlan(online_source.lengths, 80, seed=3)
    cpu = torch.device("cpu")
    ov = OverlappedBatches(online_source, plan, 0, plan.total_steps(1), cpu)
    want = [online_source.batch(plan.step(s).micro_batches[0], cpu) for s in (3, 4)]
    try:
        _same(ov.get(3, 0, plan.step(3).micro_batches[0]), want[0])  # jumped ahead: a miss, still right
        _same(ov.get(4, 0, plan.step(4).micro_batches[0]), want[1])
        assert ov.misses == 1 and ov.hits == 1
    finally:
        ov.close()


def test_default_by_device_and_the_environment_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert overlap_wanted(torch.device("cuda")) and not overlap_wanted(torch.device("cpu"))
    monkeypatch.setenv(ENV, "1")
    assert overlap_wanted(torch.device("cpu"))
    monkeypatch.setenv(ENV, "0")
    assert not overlap_wanted(torch.device("cuda"))


def test_training_with_overlap_gives_the_plain_run(tiny_target, data, tmp_path, monkeypatch):
    from core.train import train

    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(ENV, flag)
        out = tmp_path / f"run-{flag}"
        train(tiny_cfg(tiny_target, data, out, max_steps=6, grad_accum=2, save_every=6, eval_every=3))
        runs[flag] = out
    plain, over = runs["0"], runs["1"]
    assert [comparable(r) for r in metric_lines(over)] == [comparable(r) for r in metric_lines(plain)]
    a, b = draft_weights(plain / "checkpoints" / "step-6"), draft_weights(over / "checkpoints" / "step-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
