"""Prefetching the training schedule (core.train.data.prefetch_loader): the same micro-batches, in
the same order, from any resume step, with or without worker processes."""

from __future__ import annotations

import pytest
import torch

from core.train.data import BatchPlan


class _FakeSource:
    """Documents whose features encode their index (so a batch names what it holds)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def batch(self, indices, device):
        from core.train.data import collate

        docs = [{"input_ids": torch.full((self.lengths[i],), i), "loss_mask": torch.ones(self.lengths[i]),
                 "aux_hidden": torch.full((self.lengths[i], 2), float(i)),
                 "target_topk_ids": torch.zeros(self.lengths[i], 3, dtype=torch.long),
                 "target_topk_probs": torch.full((self.lengths[i], 3), 1 / 3),
                 "position_mask": torch.ones(self.lengths[i])} for i in indices]
        return collate(docs, device)


def _expected(src, plan, start, end):
    return [src.batch(mb, torch.device("cpu")) for s in range(start, end) for mb in plan.step(s).micro_batches]


def _same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_loader_reads_the_plan_in_order_from_the_resume_step():
    from core.train.data import prefetch_loader

    lengths = [5, 9, 3, 7, 8, 2, 6, 4, 9, 5, 3, 7] * 3
    src = _FakeSource(lengths)
    plan = BatchPlan(lengths, 16, seed=3, grad_accum=2)
    total = plan.total_steps(2)  # crosses an epoch boundary
    assert total > 6
    _same(list(prefetch_loader(src, plan, 0, total, workers=0)), _expected(src, plan, 0, total))
    _same(list(prefetch_loader(src, plan, 5, total, workers=0)), _expected(src, plan, 5, total))  # resume


@pytest.mark.slow
def test_prefetch_loader_with_worker_processes():
    from core.train.data import prefetch_loader

    lengths = [5, 9, 3, 7, 8, 2, 6, 4, 9, 5, 3, 7] * 2
    src = _FakeSource(lengths)
    plan = BatchPlan(lengths, 16, seed=1, world_size=2, rank=1, grad_accum=1)
    total = plan.total_steps(1)
    got = list(prefetch_loader(src, plan, 2, total, workers=2, prefetch=2))
    _same(got, _expected(src, plan, 2, total))


@pytest.mark.slow
def test_prefetch_workers_ignore_ctrl_c_meant_for_the_trainer():
    """Ctrl-C reaches the whole process group; the trainer finishes its step, the readers keep reading."""
    import os
    import signal

    from core.train.data import prefetch_loader

    lengths = [5, 9, 3, 7] * 6
    src = _FakeSource(lengths)
    plan = BatchPlan(lengths, 16, seed=0)
    total = plan.total_steps(1)
    it = iter(prefetch_loader(src, plan, 0, total, workers=1, prefetch=1))
    got = [next(it)]
    for w in it._workers:
        os.kill(w.pid, signal.SIGINT)
    got += list(it)
    _same(got, _expected(src, plan, 0, total))
