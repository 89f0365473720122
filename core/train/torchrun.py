"""`python -m core.train.torchrun ARGS`: torchrun (torch.distributed.run) for `eagle train --nproc N`,
except that a SIGINT / SIGTERM ends it with exit code 130 instead of a traceback.

torchrun forwards the signal to its workers and waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
30 s by default) while they checkpoint the step they are on (core.train.interrupt).
"""

from __future__ import annotations

import sys

from core.errors import EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except SignalException:
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
