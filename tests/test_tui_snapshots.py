"""SVG snapshots of every pane, the resume prompt, the budget warning, help and a running dashboard.

Deterministic by construction: fixed disk / RAM / GPU readings, a fixed working directory and cache
path, no cursor blink, no animations, and dashboards fed a scripted event list (the same events an
`eagle run` emits) instead of a live process. `python -m eagle_tui.screenshots` turns these SVGs into
screenshots/*.png. Refresh after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import events as ev
from core.manifest import Manifest
from core.runconfig import RunConfig
from eagle_tui.jobs import JobState
from eagle_tui.screens.dashboard import DashboardScreen
from tui_support import GB, fixed_system, make_app, write_jsonl

SIZE = (120, 40)
SNAP_DIR = Path("/tmp/eagle-tui-snapshots")  # same absolute paths on every machine


@pytest.fixture
def snapdir(monkeypatch):
    SNAP_DIR.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(SNAP_DIR)
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(SNAP_DIR / "cache"))
    return SNAP_DIR


def app_for(tmp_path, config=None, **kw):
    cfg = config or RunConfig(workdir="eagle-work")
    return make_app(tmp_path, config=cfg, system=kw.pop("system", fixed_system(disk_free=120 * GB)), **kw)


async def settle(pilot):
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def go(index):
    async def run_before(pilot):
        pilot.app.screen.go(index)
        await settle(pilot)
    return run_before


def test_pane_dataset(snap_compare, snapdir, tmp_path):
    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=go(0))


def test_pane_dataset_preview(snap_compare, snapdir, tmp_path):
    good = {"messages": [{"role": "user", "content": "How do I reverse a list in Python?"},
                         {"role": "assistant", "content": "Use reversed(xs) or xs[::-1]."}]}
    other = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]}
    write_jsonl(snapdir / "chats.jsonl", [good, {"messages": []}, other, good,
                                          {"messages": [{"role": "user", "content": "hi"}]}, other])
    cfg = RunConfig(workdir="eagle-work")
    cfg.dataset.source = "chats.jsonl"

    async def run_before(pilot):
        app = pilot.app
        pane = app.screen.query_one("#pane-dataset")
        pane.action_preview()
        for _ in range(1200):  # up to a minute on a loaded 2-core CI machine
            await pilot.pause(0.05)
            if "chats.jsonl" in app.known_rows:  # set right after the preview is shown
                break
        await settle(pilot)
        pane.scroll_end(animate=False)
        await settle(pilot)

    assert snap_compare(app_for(tmp_path, cfg), terminal_size=SIZE, run_before=run_before)


def test_pane_regenerate(snap_compare, snapdir, tmp_path):
    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=go(1))


def test_pane_cache_or_online(snap_compare, snapdir, tmp_path):
    cfg = RunConfig(workdir="eagle-work")
    cfg.dataset.limit = 2000
    cfg.features.max_length = 1024

    async def run_before(pilot):
        pilot.app.screen.go(2)
        await settle(pilot)
        pilot.app.screen.query_one("#pane-features").scroll_end(animate=False)
        await settle(pilot)

    assert snap_compare(app_for(tmp_path, cfg), terminal_size=SIZE, run_before=run_before)


def test_pane_train_invalid_input(snap_compare, snapdir, tmp_path):
    async def run_before(pilot):
        app = pilot.app
        app.screen.go(3)
        await settle(pilot)
        app.screen.query_one("#f-train-epochs-control").focus()
        await pilot.press("backspace", "0")
        await settle(pilot)

    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_pane_evaluate_and_serve(snap_compare, snapdir, tmp_path):
    async def run_before(pilot):
        pilot.app.screen.go(4)
        await settle(pilot)
        pilot.app.screen.query_one("#pane-serve").scroll_end(animate=False)
        await settle(pilot)

    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_budget_warning(snap_compare, snapdir, tmp_path):
    async def run_before(pilot):
        pilot.app.screen.go(2)
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)

    app = app_for(tmp_path, config_path=Path("eagle-run.yaml"), system=fixed_system(disk_free=2 * GB))
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_resume_prompt(snap_compare, snapdir, tmp_path):
    d = snapdir / "resume-work" / "cache"
    if d.exists():
        import shutil

        shutil.rmtree(d)
    d.mkdir(parents=True)
    m = Manifest(kind="cache", format_version=1, created=1767225600.0,
                 settings={"aux_dtype": "fp8", "target_store": "topk", "topk": 64, "max_length": 2048,
                           "aux_layer_ids": [1, 14, 26], "draft_vocab_size": 32000})
    for i in range(3):
        name = f"shard-{i:06d}.safetensors"
        (d / name).write_bytes(bytes(1000 * (i + 1)))
        m.add_shard(d, name, samples=256)
    m.extra = {"target": "SmolLM2-135M-Instruct"}
    m.save(d)
    os.utime(d / "manifest.json")
    cfg = RunConfig(workdir="resume-work")

    async def run_before(pilot):
        pilot.app.screen.go(2)
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        pilot.app.clear_notifications()  # the "Saved" toast would cover the prompt
        await settle(pilot)

    app = app_for(tmp_path, cfg, config_path=Path("resume.yaml"))
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def scripted_job(app, steps, events, status="running"):
    job = JobState(id=1, steps=steps, argv=["eagle"], started=0.0)
    job.add_log("$ --events jsonl run eagle-run.yaml --steps " + ",".join(steps), "dim")
    for e in events:
        job.apply(e)
    job.status = status
    app.jobs.jobs[1] = job
    return job


def test_dashboard_cache_running(snap_compare, snapdir, tmp_path):
    events = [ev.StageStarted(stage="regen", total=40, settings={"shard_size": 16}),
              ev.StageFinished(stage="regen", summary={"samples": 40, "failed": 1, "tokens_per_s": 18.7}),
              ev.StageStarted(stage="cache", total=40, settings={"shard_size": 8})]
    for i in range(1, 28):
        events.append(ev.Progress(stage="cache", done=i, total=40, rate=1.6, eta_s=(40 - i) / 1.6,
                                  extra={"tokens_per_s": 151.0}))
        if i % 8 == 0:
            events.append(ev.ShardDone(stage="cache", shard=i // 8 - 1, samples=8, shards_done=i // 8,
                                       shards_total=5, path=f"shard-{i // 8 - 1:06d}.safetensors"))
        if i == 13:
            events.append(ev.SampleFailed(stage="cache", index=13, reason="longer than max_length, truncated"))

    async def run_before(pilot):
        scripted_job(pilot.app, ["regen", "cache", "train"], events)
        pilot.app.push_screen(DashboardScreen(1))
        await settle(pilot)

    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_dashboard_training_curves(snap_compare, snapdir, tmp_path):
    events = [ev.StageStarted(stage="train", total=60, unit="steps", settings={"ttt_length": 3})]
    for s in range(1, 43):
        events.append(ev.StepMetrics(stage="train", step=s, metrics={
            "loss": 6.0 / (1 + 0.15 * s), "acc_0": 0.7 * (1 - 1 / (1 + 0.1 * s)),
            "acc_1": 0.55 * (1 - 1 / (1 + 0.08 * s)), "acc_2": 0.45 * (1 - 1 / (1 + 0.06 * s)),
            "tau_sim": 1 + 1.6 * (1 - 1 / (1 + 0.1 * s))}))
        events.append(ev.Progress(stage="train", done=s, total=60, unit="steps", rate=0.8, eta_s=(60 - s) / 0.8,
                                  extra={"tokens_per_s": 472.0}))
        if s % 20 == 0:
            events.append(ev.CheckpointSaved(stage="train", step=s, path=f"eagle-work/run/checkpoints/step-{s}"))
            events.append(ev.StepMetrics(stage="train", step=s, split="val", metrics={"tau_sim": 1 + 1.5 * s / 42}))

    async def run_before(pilot):
        scripted_job(pilot.app, ["train"], events)
        pilot.app.push_screen(DashboardScreen(1))
        await settle(pilot)

    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_help(snap_compare, snapdir, tmp_path):
    assert snap_compare(app_for(tmp_path), terminal_size=SIZE, press=["f1"])
