"""The terminal renderer: training logs a readable number of lines, validation every time."""

from __future__ import annotations

import pytest
from rich.console import Console

from core import events as ev
from eagle_tui.render import ConsoleSink


def _rendered(events) -> list[str]:
    sink = ConsoleSink()
    sink.console = Console(record=True, width=200, file=open("/dev/null", "w"))
    sink.interactive = False
    for e in events:
        sink(e)
    return sink.console.export_text().splitlines()


def test_train_steps_are_thinned_and_validation_is_kept():
    metrics = {"loss": 2.5, "acc_0": 0.25, "tau_sim": 1.3, "lr": 1e-4, "supervised": 600.0}
    events = [ev.StageStarted(stage="train", total=400, unit="steps")]
    events += [ev.StepMetrics(stage="train", step=s, split="train", metrics=metrics) for s in range(1, 401)]
    events += [ev.StepMetrics(stage="train", step=400, split="val", metrics={"acc_0": 0.3, "loss_0": 4.0})]
    lines = [x for x in _rendered(events) if "step " in x and "steps" not in x]
    train = [x for x in lines if x.startswith("  [train]")]
    assert [int(x.split("step ")[1].split(":")[0]) for x in train] == [1, *range(20, 401, 20)]
    assert train[0] == "  [train] step 1: loss=2.5 acc_0=0.25 tau_sim=1.3 lr=0.0001"  # the key metrics only
    assert lines[-1] == "  [val] step 400: acc_0=0.3 loss_0=4"


def test_unknown_total_logs_every_step():
    events = [ev.StepMetrics(stage="train", step=s, split="train", metrics={"loss": 1.0}) for s in (1, 2, 3)]
    assert [x for x in _rendered(events) if "[train]" in x] == [f"  [train] step {s}: loss=1" for s in (1, 2, 3)]


@pytest.mark.slow
def test_long_paths_stay_on_one_line_when_stdout_is_not_a_terminal():
    import subprocess
    import sys

    long = "/tmp/" + "/".join(["a-rather-long-folder-name"] * 12) + "/model"
    code = ("from core import events as ev; from eagle_tui.render import ConsoleSink; "
            f"ConsoleSink()(ev.Log(stage='assets', message='converting x into {long} (once)'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"}).stdout
    assert [x for x in out.splitlines() if x.strip()] == [f"converting x into {long} (once)"]
