"""Online training: the frozen target's forward for the NEXT micro-batch runs while the draft trains
on this one (issue 13, part 2).

One worker thread computes `source.batch(micro_batch)` (the target forward, head, collation) in
schedule order, one micro-batch ahead. On CUDA it runs on a stream of its own: the target's kernels
queue next to the draft's forward/backward instead of after them, and the CPU time of launching
them overlaps too. The consumer's stream waits on an event recorded after the batch was made, and
every batch tensor is marked as used on the consumer's stream (`record_stream`), so the caching
allocator never hands its memory out while the draft still reads it.

The schedule is a pure function of the step (core.train.data.BatchPlan), so the prefetched batch is
exactly the one the plain path would compute; `get(step, j, mb)` checks that and computes in place
when it is not (e.g. after a resume jumped elsewhere). `drain()` waits for the worker: the loop calls
it before anything else uses the same target (validation), whose feature hooks are not shareable
across threads.

Where it runs: on CUDA by default; on CPU the two would share the same few cores (the target
forward already uses all of them), so it is off there. `EAGLE_OVERLAP_TARGET=1` / `=0` forces it
on / off (tests and benches; the result is identical either way).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

ENV = "EAGLE_OVERLAP_TARGET"


def overlap_wanted(device: torch.device) -> bool:
    """On by default on CUDA, off on CPU; EAGLE_OVERLAP_TARGET=1/0 overrides."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda"


class OverlappedBatches:
    """Micro-batches of an online source in schedule order, each computed one ahead in a thread."""

    def __init__(self, source: Any, plan: Any, start_step: int, end_step: int, device: torch.device,
                 ahead: int = 1):
        self.source, self.device, self.ahead = source, torch.device(device), max(1, int(ahead))
        self._order = [(s, j, tuple(mb)) for s in range(start_step, end_step)
                       for j, mb in enumerate(plan.step(s).micro_batches)]
        self._next = 0  # index in _order of the next item to submit
        self._pending: list[tuple[tuple[int, int, tuple[int, ...]], Future]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle-target")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.hits = self.misses = 0

    # ---- worker side ------------------------------------------------------------------------------
    def _make(self, mb: Sequence[int]):
        if self._stream is None:
            return self.source.batch(list(mb), self.device), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            batch = self.source.batch(list(mb), self.device)
            done = torch.cuda.Event()
            done.record(self._stream)
        return batch, done

    def _fill(self) -> None:
        while len(self._pending) < self.ahead and self._next < len(self._order):
            key = self._order[self._next]
            self._next += 1
            self._pending.append((key, self._pool.submit(self._make, key[2])))

    # ---- consumer side ----------------------------------------------------------------------------
    def get(self, step: int, j: int, mb: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of micro-batch j of `step` (indices `mb`); starts computing the next one."""
        key = (step, j, tuple(mb))
        if not self._pending:
            self._fill()
        if self._pending and self._pending[0][0] == key:
            _, fut = self._pending.pop(0)
            batch, done = fut.result()
            self.hits += 1
        else:  # off schedule: drop what was read ahead, compute this one here
            self.drain()
            self._pending.clear()
            pos = next((i for i, k in enumerate(self._order) if k == key), None)
            self._next = len(self._order) if pos is None else pos + 1
            batch, done = self._make(mb)
            self.misses += 1
        if done is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(done)
            for t in batch.values():
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(consumer)
        self._fill()  # the next micro-batch's target forward runs while the draft trains on this one
        return batch

    def drain(self) -> None:
        """Wait until the worker is idle (results stay queued)."""
        for _, fut in self._pending:
            fut.exception()  # waits; an error is raised again by get()

    def close(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
