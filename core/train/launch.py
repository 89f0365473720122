"""Worker entry for torchrun: `python -m core.train.torchrun ... -m core.train.launch CONFIG_JSON`.

Every process runs `train()` with the same TrainConfig; rank 0 prints the events as JSON lines
on stdout (the parent `eagle train --nproc N` renders them). An EagleError becomes a StageFailed
event and the error's exit code, like the CLI.
"""

from __future__ import annotations

import json
import os
import sys

from core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EagleError
from core.events import JsonlSink, NullSink, StageFailed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.train.launch CONFIG_JSON", file=sys.stderr)
        return 2
    from core.train import TrainConfig, train

    rank = int(os.environ.get("RANK", "0"))
    sink = JsonlSink(sys.stdout) if rank == 0 else NullSink()
    try:
        cfg = TrainConfig.from_dict(json.loads(argv[0]))
        train(cfg, sink)
        return 0
    except EagleError as e:
        sink(StageFailed(stage="train", message=str(e), exit_code=e.exit_code))
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # unexpected: one line per rank, the traceback with EAGLE_DEBUG=1
        if os.environ.get("EAGLE_DEBUG", "") not in ("", "0"):
            raise
        msg = f"{type(e).__name__}: {e}"
        sink(StageFailed(stage="train", message=msg, exit_code=EXIT_FAILURE))
        print(f"error (rank {rank}): {msg}", file=sys.stderr, flush=True)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
