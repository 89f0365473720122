"""CPU training: let glibc's malloc keep freed memory for reuse instead of handing it back.

A training step allocates and frees the same large tensors every step (activations, one chunk of
head logits, gradients; tens of MB each). glibc serves blocks above its mmap threshold (at most
32 MB by default) with fresh mmaps and unmaps them on free, so every step faults those pages in
again and the kernel zeroes them: on the 2-core VM this project is measured on, a fresh 42 MB
tensor costs about 50 ms before any arithmetic, against about 20 ms for the arithmetic itself
(bench/train.py's step allocates dozens of them). With a high mmap threshold and trim threshold
the heap keeps those pages and the next step reuses them. Peak RSS stays what the step needs (the
memory is reused, not added); RSS simply does not shrink between steps.

Process-wide and glibc-only (elsewhere a no-op); `train()` applies it on CPU runs, bench/train.py's
worker too. EAGLE_CPU_MALLOC=0 leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "EAGLE_CPU_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIMIT = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB free at its top kept
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply once per process; True when glibc took the settings."""
    global _done
    if _done is not None:
        return _done
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off") or not sys.platform.startswith("linux"):
        _done = False
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        _done = False
    return _done
