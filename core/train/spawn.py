"""`eagle train --nproc N`: launch torchrun on this machine and relay rank 0's events.

The workers run `core.train.launch` with the validated TrainConfig as JSON. Their JSON-line events
are parsed back into typed events for the caller's sink; other output passes through to stderr.
The run-directory refusal rules are checked here first, so a refused run starts no process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.errors import EXIT_INTERRUPTED, EagleError, OutputExistsError, SettingsMismatchError, UsageError
from core.events import EventSink, StageFailed, StageFinished, event_from_dict
from core.manifest import diff_settings, load_manifest
from core.train.config import TRAIN_FORMAT_VERSION, TrainConfig
from core.target_server import die_with_parent
from core.train.interrupt import handling


def check_output_dir(cfg: TrainConfig, world_size: int) -> None:
    """The refusal rules of core.manifest.prepare_output_dir, without writing anything."""
    from core import locking
    from core.manifest import has_output

    d = Path(cfg.output_dir)
    who = locking.holder(d)  # refused before torchrun starts (rank 0 takes the lock itself)
    if who is not None and not locking.is_held(d):
        raise locking.FolderLockedError(str(d), who)
    if not has_output(d):
        return
    m = load_manifest(d)
    if not cfg.resume or m is None:
        what = "earlier output (manifest.json)" if m else "files"
        raise OutputExistsError(f"{d} already holds {what}",
                                hint="pass --resume to continue it, or choose an empty directory")
    if m.kind != "train":
        raise UsageError(f"{d} holds a '{m.kind}' output, not 'train'")
    if m.format_version != TRAIN_FORMAT_VERSION:
        raise UsageError(f"{d} was written with format version {m.format_version}; "
                         f"this version writes {TRAIN_FORMAT_VERSION}", hint="use a new output directory")
    from core.train.distributed import resolve_device

    diff = diff_settings(m.settings, cfg.settings(world_size, resolve_device(cfg.device).type, m.settings))
    if diff:
        raise SettingsMismatchError(str(d), diff)


def torchrun_argv(cfg: TrainConfig) -> list[str]:
    return [sys.executable, "-m", "core.train.torchrun", "--standalone",
            "--nproc-per-node", str(cfg.nproc), "-m", "core.train.launch", json.dumps(cfg.to_dict())]


def run_torchrun(cfg: TrainConfig, events: EventSink) -> dict[str, Any]:
    """Run the training under torchrun; returns the StageFinished summary.

    torchrun runs in its own session, so a signal meant for this process group (Ctrl-C in a
    terminal, Cancel in the TUI) reaches it once: this process forwards the first SIGINT / SIGTERM
    to torchrun, which forwards it to its workers; they save the step they are on and exit, and
    their last events are still relayed before KeyboardInterrupt is raised here. If this process
    dies, torchrun gets SIGTERM (PR_SET_PDEATHSIG) and the workers stop the same way.
    """
    check_output_dir(cfg, cfg.nproc)
    env = dict(os.environ)
    # torchrun would pin every worker to 1 thread; share this machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    proc = subprocess.Popen(torchrun_argv(cfg), stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
                            start_new_session=True, preexec_fn=die_with_parent)
    summary: dict[str, Any] | None = None
    failed: StageFailed | None = None
    forwarded = _Forward(proc)
    with handling(forwarded):
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    ev = event_from_dict(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(line, end="", file=sys.stderr)
                    continue
                if isinstance(ev, StageFailed):
                    failed = ev
                    continue  # the CLI reports the failure itself
                if isinstance(ev, StageFinished):
                    summary = ev.summary
                events(ev)
            rc = proc.wait()
        except BaseException:  # e.g. the sink failed: torchrun must not outlive us
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
            raise
    if forwarded.signum is not None or rc in (-signal.SIGINT, -signal.SIGTERM, EXIT_INTERRUPTED):
        raise KeyboardInterrupt
    if failed is not None:
        err = EagleError(failed.message)
        err.exit_code = failed.exit_code
        raise err
    if rc != 0 or summary is None:
        raise EagleError(f"torchrun exited with code {rc} before the training finished",
                         hint="see the worker output above")
    return summary


class _Forward:
    """Forward the first SIGINT / SIGTERM to torchrun; later ones are dropped (torchrun is already
    stopping its workers, and a second signal would make it abandon them)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if self.proc.poll() is None:
                self.proc.send_signal(signum)

