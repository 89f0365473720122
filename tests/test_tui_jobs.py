"""Jobs: events folded into dashboard state, a real subprocess run from the wizard, cancel of the
whole process group (grandchild included), failures, and leaving the dashboard keeping the job."""

from __future__ import annotations

import json

from textual.widgets import RichLog, Static

from core import events as ev
from eagle_tui.jobs import JobState, group_alive
from eagle_tui.screens.dashboard import DashboardScreen
from eagle_tui.screens.wizard import WizardScreen
from eagle_tui.widgets.curves import CurveRow, metric_label, plotted
from eagle_tui.widgets.progress import summary_text
from tui_support import make_app, plain, wait_for

SIZE = (120, 40)


def test_job_state_folds_events():
    job = JobState(id=1, steps=["regen", "train"], argv=["eagle"])
    job.apply(ev.StageStarted(stage="regen", total=10, settings={"shard_size": 4}))
    job.apply(ev.Progress(stage="regen", done=6, total=10, rate=2.0, eta_s=2.0))
    job.apply(ev.ShardDone(stage="regen", shard=0, samples=4, shards_done=1, shards_total=3))
    job.apply(ev.SampleFailed(stage="regen", index=7, reason="timeout"))
    job.apply(ev.StageFinished(stage="regen", summary={"samples": 10}))
    regen = job.stages["regen"]
    assert (regen.done, regen.total, regen.shard_size, regen.shards, regen.failures) == (10, 10, 4, {0: 4}, 1)
    assert regen.status == "finished" and regen.summary == {"samples": 10}
    job.apply(ev.StageStarted(stage="train", total=100, unit="steps"))
    job.apply(ev.StepMetrics(stage="train", step=1, metrics={"loss": 3.0, "acc_0": 0.5, "flag": True}))
    job.apply(ev.StepMetrics(stage="train", step=2, metrics={"loss": 2.0, "acc_0": 0.6}))
    job.apply(ev.StepMetrics(stage="train", step=2, split="val", metrics={"tau_sim": 1.8}))
    train = job.stages["train"]
    assert job.current == "train"
    assert train.metrics["train"]["loss"] == [(1, 3.0), (2, 2.0)]
    assert "flag" not in train.metrics["train"]
    assert train.metrics["val"]["tau_sim"] == [(2, 1.8)]
    assert job.failures == 1 and list(job.failure_reasons) == [(7, "timeout")]
    assert metric_label("acc_2", "train") == "acc TTT2" and metric_label("tau_sim", "val") == "val τ_sim"
    # the real τ measured on held-out prompts at each checkpoint is a curve next to τ_sim
    job.apply(ev.StepMetrics(stage="train", step=2, split="heldout", metrics={"tau": 1.6, "acc_pos_0": 0.4}))
    assert train.metrics["heldout"]["tau"] == [(2, 1.6)]
    assert plotted("tau", "heldout") and not plotted("acc_pos_0", "heldout")
    assert metric_label("tau", "heldout") == "held-out τ"


def test_pipeline_summary_labels_measured_speedup_and_prompt_set():
    text = summary_text({"tau": 1.5, "measured_speedup": 0.9, "implied_speedup": 1.2, "lossless": True,
                         "prompt_set": {"count": 12, "held_out": 12, "trained_on": 0}}, pipeline=True).plain
    assert "speedup measured here: 0.9" in text and "implied speedup: 1.2" in text
    assert "τ measured on: 12 prompts, 12 held out" in text
    text = summary_text({"measured_speedup": 1.12, "measured_speedup_interval": [1.0412345, 1.2],
                         "engine_speedup": 1.09, "engine_speedup_interval": [1.04, 1.1634]}, pipeline=True).plain
    assert "speedup measured here, 95% interval over prompts: [1.041, 1.2]" in text
    assert "vLLM speedup, 95% interval over prompts: [1.04, 1.163]" in text


async def test_run_step_streams_events_into_the_dashboard(tmp_path):
    record = tmp_path / "argv.jsonl"
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", FAKE_RECORD=str(record))
    async with app.run_test(size=SIZE) as pilot:
        w = app.screen
        w.go(3)  # Train
        await pilot.press("ctrl+r")
        await wait_for(lambda: app.jobs.jobs and not app.jobs.jobs[1].active, "job end")(pilot)
        await pilot.pause()
        job = app.jobs.jobs[1]
        assert job.status == "finished" and job.rc == 0
        argv = json.loads(record.read_text().splitlines()[0])
        assert argv == ["--events", "jsonl", "run", str(tmp_path / "run.yaml"), "--steps", "train"]
        assert (tmp_path / "run.yaml").exists()  # saved before the run: the subprocess reads it
        assert isinstance(app.screen, DashboardScreen)
        train = job.stages["train"]
        assert train.done == 20 and train.metrics["train"]["loss"][-1] == (20, 0.2)
        rows = {r.label: r for r in app.screen.query(CurveRow)}
        assert {"loss", "acc TTT0", "acc TTT1", "acc TTT2", "τ_sim"} <= set(rows)
        assert str(rows["loss"].query_one(".curve-value").render()) == "0.2 @20"
        title = str(app.screen.query_one("#job-title", Static).render())
        assert "job 1: train" in title and "finished" in title
        log = app.screen.query_one("#job-log", RichLog)
        assert any("train finished" in line.text for line in log.lines)


async def test_cancel_stops_the_whole_process_group(tmp_path):
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", mode="hang")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.go(1)  # Regenerate
        await pilot.press("ctrl+r")
        job_ready = lambda: app.jobs.jobs and any("grandchild" in l for _, l in app.jobs.jobs[1].log)
        await wait_for(job_ready, "grandchild started")(pilot)
        job = app.jobs.jobs[1]
        grandchild = int(next(l for _, l in job.log if "grandchild" in l).split()[-1])
        assert job.active and group_alive(job.pgid)
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("escape")  # a second run while one is active is refused
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert list(app.jobs.jobs) == [1] and isinstance(app.screen, WizardScreen)
        await pilot.press("ctrl+l")
        await pilot.pause()
        # shard bars while it runs: shard 0 written, shard 1 half way (6 of 10 samples done)
        shards = plain(app.screen.query_one("#shards"))
        await pilot.press("c")
        await wait_for(lambda: not job.active, "cancel")(pilot)
        assert job.status == "cancelled" and job.rc == 130
        assert not group_alive(job.pgid)
        assert not _alive(grandchild)
        assert any("Resume" in l for _, l in job.log)
    assert "Shards 1/3 written" in shards and "shard 1" in shards and "2/4" in shards


async def test_leaving_the_dashboard_keeps_the_job_and_failures_are_reported(tmp_path):
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", mode="fail", FAKE_DELAY="0.02")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.go(1)
        await pilot.press("ctrl+r")
        await wait_for(lambda: isinstance(app.screen, DashboardScreen), "dashboard")(pilot)
        await pilot.press("escape")
        assert isinstance(app.screen, WizardScreen)
        job = app.jobs.jobs[1]
        await wait_for(lambda: not job.active, "job end")(pilot)
        assert job.status == "failed" and job.rc == 1
        assert job.error == "regen broke (fake)"
        assert job.failures == 1
        status = str(app.screen.query_one("#status", Static).render())
        assert "job 1: regen: failed" in status
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, DashboardScreen)
        summary = str(app.screen.query_one("#job-summary", Static).render())
        assert "error: regen broke (fake)" in summary


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_quit_while_running_asks_then_stops_the_job(tmp_path):
    from eagle_tui.screens.dialogs import ConfirmScreen

    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", mode="hang")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.go(1)
        await pilot.press("ctrl+r")
        await wait_for(lambda: app.jobs.jobs and any("grandchild" in l for _, l in app.jobs.jobs[1].log),
                       "job running")(pilot)
        job = app.jobs.jobs[1]
        await pilot.press("ctrl+q")
        await wait_for(lambda: isinstance(app.screen, ConfirmScreen), "quit confirmation")(pilot)
        assert "still running" in app.screen.question
        await pilot.press("escape")  # no: keep working, the job keeps running
        await pilot.pause()
        assert job.active and app.is_running
        await pilot.press("ctrl+q")
        await wait_for(lambda: isinstance(app.screen, ConfirmScreen), "quit confirmation")(pilot)
        await pilot.press("y")
        await wait_for(lambda: not job.active, "job stopped")(pilot)
    assert job.status == "cancelled" and not group_alive(job.pgid)


async def test_curves_take_updates_before_their_rows_are_composed():
    """CI once failed here: a second job update reached rows remounted by the first before their
    sparklines existed (NoMatches). Updates in the same tick must be kept and drawn."""
    from textual.app import App

    from eagle_tui.widgets.curves import Curves

    class One(App):
        def compose(self):
            yield Curves()

    app = One()
    async with app.run_test(size=SIZE) as pilot:
        curves = app.query_one(Curves)
        first = {"train": {"loss": [(1, 3.0)]}}
        second = {"train": {"loss": [(1, 3.0), (2, 2.5)]}}
        curves.show(first)  # mounts the row
        curves.show(second)  # the row exists, its children not yet
        await pilot.pause()
        await pilot.pause()
        row = app.query_one(CurveRow)
        assert str(row.query_one(".curve-value").render()) == "2.5 @2"
