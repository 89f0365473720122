"""The resume prompt: what is on disk, Resume (--resume), Start over (deletes only after a second,
explicit confirmation), Cancel (nothing starts, nothing deleted)."""

from __future__ import annotations

import json

from textual.widgets import Button

from core.manifest import Manifest
from eagle_tui.screens.dashboard import DashboardScreen
from eagle_tui.screens.dialogs import ConfirmScreen, ResumeScreen, find_existing_work
from eagle_tui.screens.wizard import WizardScreen
from tui_support import make_app, plain, wait_for

SIZE = (120, 40)


def earlier_regen(workdir, shards=2, complete=False):
    d = workdir / "regen"
    d.mkdir(parents=True)
    m = Manifest(kind="regen", format_version=1, settings={"max_new_tokens": 512, "temperature": 0.0})
    for i in range(shards):
        (d / f"shard-{i:06d}.parquet").write_bytes(b"x" * 100)
        m.add_shard(d, f"shard-{i:06d}.parquet", samples=256)
    m.complete = complete
    m.save(d)
    return d


async def open_resume_prompt(app, pilot):
    app.screen.go(1)  # Regenerate
    await pilot.press("ctrl+r")
    await wait_for(lambda: isinstance(app.screen, ResumeScreen), "resume prompt")(pilot)
    return app.screen


def test_find_existing_work_describes_the_folder(tmp_path):
    assert find_existing_work("regen", tmp_path / "none") is None
    (tmp_path / "empty").mkdir()
    assert find_existing_work("regen", tmp_path / "empty") is None
    d = earlier_regen(tmp_path)
    w = find_existing_work("regen", d)
    assert w.resumable and w.files == 3 and len(w.manifest.shards) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    w = find_existing_work("regen", tmp_path / "junk")
    assert not w.resumable and "no manifest.json" in w.error
    (d / "manifest.json").write_text("{broken")
    w = find_existing_work("regen", d)
    assert not w.resumable and "not valid JSON" in w.error


async def test_resume_prompt_shows_work_and_resume_passes_flag(tmp_path):
    record = tmp_path / "argv.jsonl"
    d = earlier_regen(tmp_path / "work")
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", FAKE_RECORD=str(record))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_resume_prompt(app, pilot)
        text = "".join(plain(s) for s in screen.query(".work"))
        assert str(d) in text and "2 (512 samples)" in text and "unfinished: can be resumed" in text
        assert "max_new_tokens=512" in text
        assert app.focused.id == "resume"
        await pilot.press("r")
        await wait_for(lambda: app.jobs.jobs and not app.jobs.jobs[1].active, "job")(pilot)
        assert isinstance(app.screen, DashboardScreen)
    argv = json.loads(record.read_text().splitlines()[0])
    assert argv[-3:] == ["--steps", "regen", "--resume"]
    assert (d / "shard-000000.parquet").exists()


async def test_start_over_deletes_only_after_confirmation(tmp_path):
    record = tmp_path / "argv.jsonl"
    d = earlier_regen(tmp_path / "work")
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", FAKE_RECORD=str(record))
    async with app.run_test(size=SIZE) as pilot:
        await open_resume_prompt(app, pilot)
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert app.focused.id == "no"  # the safe answer is the default
        await pilot.press("escape")  # no: back to the resume prompt, nothing deleted
        await pilot.pause()
        assert isinstance(app.screen, ResumeScreen) and d.exists()
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(lambda: app.jobs.jobs and not app.jobs.jobs[1].active, "job")(pilot)
        assert not (d / "shard-000000.parquet").exists()
    argv = json.loads(record.read_text().splitlines()[0])
    assert argv[-2:] == ["--steps", "regen"]


async def test_cancel_starts_nothing_and_keeps_everything(tmp_path):
    d = earlier_regen(tmp_path / "work", complete=True)
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_resume_prompt(app, pilot)
        assert "complete" in "".join(plain(s) for s in screen.query(".work"))
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, WizardScreen)
        assert not app.jobs.jobs and len(list(d.iterdir())) == 3


async def test_folder_without_manifest_cannot_be_resumed(tmp_path):
    junk = tmp_path / "work" / "regen"
    junk.mkdir(parents=True)
    (junk / "notes.txt").write_text("mine")
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_resume_prompt(app, pilot)
        assert screen.query_one("#resume", Button).disabled
        assert "no manifest.json" in "".join(plain(s) for s in screen.query(".work"))
        await pilot.press("r")  # refused
        await pilot.pause()
        assert isinstance(app.screen, ResumeScreen)
        await pilot.press("escape")
        assert (junk / "notes.txt").read_text() == "mine"


def test_training_run_shows_its_checkpoints(tmp_path):
    from eagle_tui.screens.dialogs import describe_work
    from rich.console import Console

    run = tmp_path / "run"
    for step in (5, 10, 15):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
    Manifest(kind="train", format_version=1, settings={"lr": 0.0001}).save(run)
    w = find_existing_work("train", run)
    console = Console(width=120, color_system=None)
    with console.capture() as cap:
        console.print(describe_work(w))
    text = cap.get()
    assert "step-5, step-10, step-15  (resumes from the newest)" in text and "shards done" not in text
