"""SIGINT / SIGTERM during training: stop at an optimizer-step boundary with resumable state.

`StopSignals` replaces the SIGINT and SIGTERM handlers while `train()` runs and puts the previous
ones back afterwards (the pipeline and tests call `train()` in-process). Before the training loop
starts nothing would be lost, so a signal raises KeyboardInterrupt at once. Once the loop runs
(`deferred`), the first signal only records a stop request: the loop finishes the current
optimizer step, all processes agree on the stop step (`agreed`, a MAX all-reduce of the flag
every step, so DDP/FSDP never wait on a rank that left), a checkpoint is written and
KeyboardInterrupt ends the run (exit code 130). A second signal forces KeyboardInterrupt at once,
except while a checkpoint is being written: then it is ignored so the save completes (its writes
are atomic either way, and the handler never re-enters the save).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handling(handler: Any) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM while the block runs, then the previous handlers again.
    Handlers live in the main thread only: elsewhere (a thread running the pipeline) a no-op."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            # None: the previous handler was not installed from Python; the default is closest
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.deferred = False
        self._saving = False
        self._handling = handling(self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> "StopSignals":
        self._handling.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._handling.__exit__(*exc)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.deferred:
                raise KeyboardInterrupt
            return
        if not self._saving:  # a second signal mid-step: stop now, the last checkpoint stands
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def agreed(self, distributed: bool, device: torch.device) -> bool:
        """Whether any process has a stop request (a collective when distributed: every rank
        calls it at the same step)."""
        if not distributed:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
