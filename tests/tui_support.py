"""Helpers for the TUI tests: an App with fixed machine readings, and a scripted stand-in for the
`eagle run` subprocess (a real process emitting real core.events JSON lines; it lets the tests hold
the dashboard and cancel to exact values without waiting for a model)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from core.runconfig import RunConfig
from eagle_tui.app import EagleApp
from eagle_tui.sysinfo import GpuInfo, SystemInfo

GB = 1_000_000_000

# argv: --events jsonl run CONFIG --steps a,b [--resume]
# env FAKE_MODE: "quick" (finish), "hang" (start a grandchild, then wait for a signal),
#                "fail" (exit 1 with an error line)
FAKE_EAGLE = textwrap.dedent(r'''
    import json, os, signal, subprocess, sys, time
    argv = sys.argv[1:]
    steps = argv[argv.index("--steps") + 1].split(",")
    mode = os.environ.get("FAKE_MODE", "quick")
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    record = os.environ.get("FAKE_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(argv) + "\n")
    def emit(event, stage, **kw):
        print(json.dumps({"event": event, "stage": stage, **kw}), flush=True)
        if delay:
            time.sleep(delay)
    def interrupted(*_):
        emit("log", steps[0], level="warning", message="interrupted: state saved, resume with --resume")
        sys.exit(130)
    signal.signal(signal.SIGINT, interrupted)
    for step in steps:
        if step == "train":
            emit("stage_started", step, total=40, unit="steps", settings={"ttt_length": 3})
            for s in range(1, 21):
                loss = 4.0 / s
                emit("step_metrics", step, step=s, split="train",
                     metrics={"loss": loss, "acc_0": 1 - 0.5 / s, "acc_1": 1 - 0.7 / s, "acc_2": 1 - 0.9 / s,
                              "tau_sim": 1.0 + 2.0 * (1 - 1 / s)})
                emit("progress", step, done=s, total=40, unit="steps", rate=2.0, eta_s=float(40 - s) / 2,
                     extra={"tokens_per_s": 1234.0})
        else:
            emit("stage_started", step, total=10, unit="samples", settings={"shard_size": 4})
            for i in range(1, 11):
                emit("progress", step, done=i, total=10, unit="samples", rate=5.0, eta_s=(10 - i) / 5.0,
                     extra={"shard_size": 4})
                if i == 5:
                    emit("sample_failed", step, index=4, reason="empty conversation")
                if i % 4 == 0:
                    emit("shard_done", step, shard=i // 4 - 1, samples=4, path=f"shard-{i//4-1:06d}",
                         shards_done=i // 4, shards_total=3)
                if mode == "hang" and i == 6:
                    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                    emit("log", step, level="info", message=f"grandchild {child.pid}")
                    while True:
                        time.sleep(0.05)
        if mode == "fail":
            print("error: " + step + " broke (fake)", file=sys.stderr, flush=True)
            emit("stage_failed", step, message=step + " broke (fake)", exit_code=1)
            sys.exit(1)
        emit("stage_finished", step, summary={"samples": 10, "throughput": 5.0})
''')


def fake_eagle(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_eagle.py"
    script.write_text(FAKE_EAGLE)
    return [sys.executable, str(script)]


def fixed_system(disk_free: int = 500 * GB, gpus: list[GpuInfo] | None = None,
                 ram: int = 64 * GB) -> SystemInfo:
    return SystemInfo(gpus=gpus or [], disk_free=lambda _p: disk_free, ram_available=ram, cpu_count=2)


def make_app(tmp_path: Path, config: RunConfig | None = None, config_path: Path | None = None,
             mode: str = "quick", system: SystemInfo | None = None, **env: str) -> EagleApp:
    cfg = config or RunConfig(workdir=str(tmp_path / "work"))
    app = EagleApp(config=cfg, config_path=config_path, system=system or fixed_system(),
                   command=fake_eagle(tmp_path), env={"FAKE_MODE": mode, **env}, probe=False,
                   cursor_blink=False)
    app.animation_level = "none"
    return app


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait_for(pred, what: str):
    """An async poll for Pilot tests (bounded by iterations, not wall-clock assertions)."""
    async def _wait(pilot, tries: int = 400):
        for _ in range(tries):
            if pred():
                return
            await pilot.pause(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    return _wait


os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


def flat(widget, width: int = 110) -> str:
    """`plain` with all whitespace runs (line wraps included) collapsed to one space."""
    return " ".join(plain(widget, width).split())


def plain(widget, width: int = 110) -> str:
    """What a Static shows, as plain text (rich renderables rendered at `width`)."""
    import io

    from rich.console import Console

    content = widget.content
    if isinstance(content, str):
        return content
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(content)
    return cap.get()
